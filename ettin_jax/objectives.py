"""Training objectives: MLM (encoder), CLM (decoder) and MNTP (encoder trained from a decoder).

Each objective is a mask (what the model may see) plus a choice of which hidden states predict which labels;
all of them end in the same chunked cross-entropy over the tied 50k-way decoder:

    mlm:  bidirectional; hidden at each masked position predicts the original token there   (sparse prediction)
    mntp: bidirectional; hidden at position p-1 predicts the original token at masked position p  (LLM2Vec-style)
    clm:  causal; hidden at t predicts token t+1 when both are in the same document, never padding

The MLM corruption itself (80% [MASK], 10% random, 10% kept) is made by the data pipeline as a pure function of
(seed, step, row) (`ettin_jax.data`), so encoder and decoder read the very same batches: a batch carries `tokens`,
`segment_ids`, `positions` and, for masked objectives, `mlm_inputs`, `mlm_positions`, `mlm_labels`, `mlm_weights`.

Only the predicting positions pass through the head and decoder (sparse prediction), and the decoder's logits
exist `chunk` rows at a time: `decoder_cross_entropy` computes each chunk's loss *and* its gradients (with respect
to the features, the tied embedding and the bias) in one pass, so a [tokens, vocab] fp32 logit array never exists,
forward or backward, and no logit is computed twice (recomputing them under `jax.checkpoint`, as
`chunked_cross_entropy` does, costs a third more head FLOPs: for CLM the head is most of the model's work).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from ettin_jax import attention as attn_lib
from ettin_jax.kernels.cpu import dots as cpu_dots
from ettin_jax.kernels.cpu import fused_ce
from ettin_jax.model import Ettin


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    mask: attn_lib.Mask
    masked_inputs: bool  # reads mlm_inputs (corrupted) rather than tokens


OBJECTIVES = {
    "mlm": Objective("mlm", attn_lib.BIDIRECTIONAL, True),
    "mntp": Objective("mntp", attn_lib.BIDIRECTIONAL, True),
    "clm": Objective("clm", attn_lib.CAUSAL, False),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def chunked_cross_entropy(predict: Callable, hidden, labels, weights, chunk: int = 1024):
    """Sum of weighted CE and of weighted correct predictions over N rows, `chunk` rows of logits at a time.

    predict: hidden [C, H] -> logits [C, V] (fp32). hidden [N, H], labels [N], weights [N].
    Returns (loss_sum, correct_sum, weight_sum), all fp32 scalars.
    """
    n, h = hidden.shape
    chunk = min(chunk, n)
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    xs = (hidden.reshape(-1, chunk, h), labels.reshape(-1, chunk), weights.reshape(-1, chunk).astype(jnp.float32))

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of keeping them
    def one(x, y, w):
        logits = predict(x).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return jnp.sum(w * (lse - picked)), jnp.sum(w * correct)

    def body(carry, x):
        loss, correct = one(*x)
        return (carry[0] + loss, carry[1] + correct), None

    if xs[0].shape[0] == 1:
        loss, correct = one(xs[0][0], xs[1][0], xs[2][0])
    else:
        (loss, correct), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), xs)
    return loss, correct, jnp.sum(weights.astype(jnp.float32))


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
        # Column sums as a matrix-vector product: XLA:CPU's reduction over the major axis of [C, V] is ~50x slower.
        d_bias = carry[3] + jax.lax.dot_general(jnp.ones((xc.shape[0],), jnp.float32), dlogits,
                                                (((0,), (0,)), ((), ())))
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
    if fused_ce.usable(x, embedding, bias):  # fp32 on an AVX-512 CPU: the same computation in one native kernel
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


def prediction_targets(objective: Objective, batch):
    """(gather index [B, P], labels [B, P], weights [B, P]) of the positions that predict."""
    if objective.name == "clm":
        tokens, seg = batch["tokens"], batch["segment_ids"]
        labels = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        next_seg = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
        weights = ((seg == next_seg) & (seg > 0)).astype(jnp.float32)
        index = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return index, labels, weights
    positions = batch["mlm_positions"]
    if objective.name == "mntp":
        positions = jnp.maximum(positions - 1, 0)  # masked tokens are never a document's first ([CLS]) token
    return positions, batch["mlm_labels"], batch["mlm_weights"]


def prediction_count(objective: Objective, batch):
    """How many positions of `batch` predict (the denominator of the mean CE)."""
    _, _, weights = prediction_targets(objective, batch)
    if "row_weights" in batch:
        weights = weights * batch["row_weights"][:, None]
    return jnp.sum(weights.astype(jnp.float32))


def loss_fn(params, batch, *, model: Ettin, objective: Objective, dropout_rng=None, chunk: int = 1024,
            normalizer=None):
    """Mean CE over the predicting positions of `batch`, plus metrics (loss, accuracy, counts).

    normalizer: divide the sums by this count instead of the batch's own (gradient accumulation: the whole
    batch's count, so that summed micro-batch losses equal the full batch's mean exactly).
    """
    inputs = batch["mlm_inputs"] if objective.masked_inputs else batch["tokens"]
    deterministic = dropout_rng is None
    hidden = model.apply({"params": params}, inputs, mask=objective.mask, segment_ids=batch["segment_ids"],
                         positions=batch["positions"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": dropout_rng})
    index, labels, weights = prediction_targets(objective, batch)
    if "row_weights" in batch:  # batch-size warmup: rows beyond the current batch size do not count
        weights = weights * batch["row_weights"][:, None]
    if objective.name == "clm":  # every position predicts: no gather (and no scatter-add in the backward pass)
        picked = hidden
    else:
        picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, P, H]
    h = picked.shape[-1]
    features = model.apply({"params": params}, picked.reshape(-1, h), method=Ettin.head)
    loss_sum, correct, count = decoder_cross_entropy(
        features, params["tok_embeddings"]["embedding"], params["decoder_bias"], labels.reshape(-1),
        weights.reshape(-1), chunk)
    denom = jnp.maximum(count if normalizer is None else normalizer, 1.0)
    loss = loss_sum / denom
    metrics = dict(loss=loss, accuracy=correct / denom, predictions=count,
                   tokens=jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)))
    return loss, metrics
