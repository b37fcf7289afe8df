"""The tied decoder's cross-entropy with its gradients computed chunk by chunk in the forward pass.

A [tokens, vocab] fp32 logit array never exists, forward or backward, and no logit is computed twice: each chunk's
loss *and* its gradients (with respect to the features, the tied embedding and the bias) come out of one pass
(recomputing them under `jax.checkpoint`, as `objectives.chunked_cross_entropy` does, costs a third more head FLOPs;
for CLM the head is most of the model's work). On one AVX-512 CPU device in fp32 the native kernel
(`kernels/cpu/fused_ce.py`) does the same computation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ettin_jax.kernels.cpu import dots as cpu_dots
from ettin_jax.kernels.cpu import fused_ce
from ettin_jax.kernels.platform import platform


def column_sum(a):
    """Sum over the rows of a [C, V] array, fp32. On CPU as a vector-matrix product: XLA:CPU's reduction over the
    major axis of [C, V] is ~50x slower than the product."""
    if platform() != "cpu":
        return jnp.sum(a.astype(jnp.float32), axis=0)
    return jax.lax.dot_general(jnp.ones((a.shape[0],), jnp.float32), a, (((0,), (0,)), ((), ())))


def _decoder_ce_chunks(x, embedding, bias, labels, weights, chunk: int, with_grads: bool):
    """Per-chunk scan of `decoder_cross_entropy`; with_grads also accumulates the gradients of loss_sum."""
    n, h = x.shape
    chunks = -(-n // min(chunk, n))  # as many chunks as `chunk` rows need,
    chunk = -(-n // chunks)  # evened out over them: the least padding
    pad = (-n) % chunk
    if pad:
        x, labels, weights = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(labels, (0, pad)), jnp.pad(weights, (0, pad))
    nc = (n + pad) // chunk
    weights = weights.astype(jnp.float32)
    emb = embedding.astype(x.dtype)
    vocab = embedding.shape[0]
    emb_t = cpu_dots.enabled(x.dtype)  # accumulate dE transposed, [H, V]: see below

    def body(carry, inp):
        xc, yc, wc = inp
        logits = jax.lax.dot_general(xc, emb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        logits = logits + bias
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)
        s = jnp.sum(e, axis=-1, keepdims=True)
        lse = (m + jnp.log(s))[:, 0]
        rows = jnp.arange(xc.shape[0])
        picked = logits[rows, yc]  # a gather of C values, not a [C, V] select
        ce = lse - picked
        # The label is the argmax iff it reaches the row's max (the same up to exact fp32 ties; argmax would cost a
        # further pass over [C, V]).
        correct = (picked >= m[:, 0]).astype(jnp.float32)
        out = (carry[0] + jnp.sum(wc * ce), carry[1] + jnp.sum(wc * correct))
        if not with_grads:
            return out + carry[2:], (None, None)
        dlogits = (e * (wc[:, None] / s)).at[rows, yc].add(-wc)  # d loss_sum / d logits: w * (softmax - onehot)
        dl = dlogits.astype(x.dtype)
        dx = jax.lax.dot_general(dl, emb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        if emb_t:  # [H, V]: (xc^T) dl, a row-major product that XLA:CPU runs in bf16 (cpu_dots)
            d_emb = carry[2] + jax.lax.dot_general(cpu_dots.transposed(xc), dl, (((1,), (0,)), ((), ())),
                                                   preferred_element_type=jnp.float32)
        else:
            d_emb = carry[2] + jax.lax.dot_general(dl, xc, (((0,), (0,)), ((), ())),
                                                   preferred_element_type=jnp.float32)
        d_bias = carry[3] + column_sum(dlogits)
        return out + (d_emb, d_bias), (dx.astype(x.dtype), ce)

    zero = jnp.zeros((), jnp.float32)
    carry = (zero, zero) + ((jnp.zeros((h, vocab) if emb_t else (vocab, h), jnp.float32),
                             jnp.zeros((vocab,), jnp.float32)) if with_grads else (None, None))
    xs = (x.reshape(nc, chunk, h), labels.reshape(nc, chunk), weights.reshape(nc, chunk))
    if nc == 1:
        carry, (dx, ce) = body(carry, jax.tree_util.tree_map(lambda a: a[0], xs))
        dx, ce = (None, None) if dx is None else (dx[None], ce[None])
    else:
        carry, (dx, ce) = jax.lax.scan(body, carry, xs)
    if with_grads:
        dx, ce = dx.reshape(-1, h)[:n], ce.reshape(-1)[:n]
        if emb_t:  # behind a barrier, as cpu_dots.transposed_product does
            carry = carry[:2] + (jax.lax.optimization_barrier(carry[2]).T,) + carry[3:]
    return carry, dx, ce


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _decoder_ce(x, embedding, bias, labels, weights, chunk):
    (loss, correct, _, _), _, _ = _decoder_ce_chunks(x, embedding, bias, labels, weights, chunk, False)
    return loss, correct


def _decoder_ce_fwd(x, embedding, bias, labels, weights, chunk):
    if fused_ce.usable(x, embedding, bias):  # fp32 on one AVX-512 CPU device: the same computation natively
        ce, correct, dx, d_emb, d_bias = fused_ce.cross_entropy(x, embedding, bias, labels, weights)
        w = weights.astype(jnp.float32)
        loss, correct = jnp.sum(w * ce), jnp.sum(w * correct)
    else:
        (loss, correct, d_emb, d_bias), dx, ce = _decoder_ce_chunks(x, embedding, bias, labels, weights, chunk,
                                                                    True)
    return (loss, correct), (dx, d_emb.astype(embedding.dtype), d_bias.astype(bias.dtype), ce, labels, weights)


def _decoder_ce_bwd(chunk, res, g):
    dx, d_emb, d_bias, ce, labels, weights = res
    gl = g[0]  # the accuracy count has no gradient
    d_labels = None if not jnp.issubdtype(labels.dtype, jnp.floating) else jnp.zeros_like(labels)
    return ((gl * dx).astype(dx.dtype), gl * d_emb, gl * d_bias, d_labels,
            (gl * ce).astype(weights.dtype))


_decoder_ce.defvjp(_decoder_ce_fwd, _decoder_ce_bwd)


def decoder_cross_entropy(features, embedding, bias, labels, weights, chunk: int = 1024):
    """`chunked_cross_entropy` of the tied decoder (logits = features @ embedding^T + bias, in fp32), with the
    gradients computed chunk by chunk in the forward pass (a custom VJP): no logits are kept or recomputed.

    features [N, H] (the head's output); embedding [V, H]; bias [V]; labels [N]; weights [N].
    Returns (loss_sum, correct_sum, weight_sum) like `chunked_cross_entropy`.
    """
    loss, correct = _decoder_ce(features, embedding, bias, labels, weights, chunk)
    return loss, correct, jnp.sum(weights.astype(jnp.float32))
