"""Attention masks and the attention op: the one place where encoder and decoder differ.

A `Mask` is the value that turns the shared ModernBERT stack into an encoder (bidirectional) or a decoder
(causal). Every attention call reduces to a *band* `(back, ahead)`: key k is visible from query q iff
`-ahead <= q - k <= back` (None = unbounded), both tokens are in the same packed document (segment id), and
the key exists. Global layers use the mask's unbounded band, local (sliding-window) layers a bounded one:

    encoder, global:  (None, None)        encoder, local: (w, w)       w = local_attention // 2 = 64, 129 keys
    decoder, global:  (None, 0)           decoder, local: (k - 1, 0)   k keys including the query itself

The decoder's window defaults to Hugging Face ModernBertDecoder's semantics (k = local_attention // 2 = 64 keys),
so exported models behave identically there; Ettin's training code saw 65 keys (`decoder_window=65`).

This module is the math: the masks, `reference_attention` (dense [T, S] scores, the ground truth, also used for
KV-cache decoding) and `cached_attention`. The implementations that compute the same function without [T, T] scores
(native CPU, XLA tiled/blocked/chunked, cuDNN, splash) live behind the kernel seam, `ettin_jax.kernels`, which picks
one per layer for the platform the step is compiled for (`kernels.resolve_impl`); each is tested against
`reference_attention`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp

Band = tuple[Optional[int], Optional[int]]

_NEG_INF = -1e30  # finite, so a fully masked row (never produced for real tokens) cannot become NaN


@dataclasses.dataclass(frozen=True)
class Mask:
    """The attention mask function: bidirectional (encoder) or causal (decoder)."""

    name: str
    causal: bool

    def band(self, *, local: bool, local_window: int, decoder_window: Optional[int] = None) -> Band:
        """The (back, ahead) band of a layer.

        Args:
          local: whether the layer is a sliding-window layer.
          local_window: the encoder's half width (keys within +-local_window are visible).
          decoder_window: keys a causal local layer sees, the query included (None: local_window, as in
            Hugging Face's ModernBertDecoder).
        """
        if self.causal:
            if not local:
                return (None, 0)
            keys = local_window if decoder_window is None else decoder_window
            return (keys - 1, 0)
        return (local_window, local_window) if local else (None, None)

    def __call__(self, q_idx, k_idx):
        """The mask function itself: whether key index k may be seen from query index q (global layers)."""
        return q_idx >= k_idx if self.causal else jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(k_idx)), bool)


BIDIRECTIONAL = Mask("bidirectional", causal=False)
CAUSAL = Mask("causal", causal=True)
MASKS = {"bidirectional": BIDIRECTIONAL, "causal": CAUSAL, "encoder": BIDIRECTIONAL, "decoder": CAUSAL}


def get_mask(name_or_mask) -> Mask:
    if isinstance(name_or_mask, Mask):
        return name_or_mask
    if name_or_mask not in MASKS:
        raise ValueError(f"unknown attention mask {name_or_mask!r}; expected one of {sorted(MASKS)}")
    return MASKS[name_or_mask]


def visible(q_idx, k_idx, q_seg, k_seg, band: Band):
    """Boolean visibility of key k from query q (arrays broadcast)."""
    back, ahead = band
    d = q_idx - k_idx
    ok = q_seg == k_seg
    if back is not None:
        ok &= d <= back
    if ahead is not None:
        ok &= d >= -ahead
    return ok


def _visible_pairs(qs, ks, qi, ki, band: Band):
    """`visible` of every query against every key: segment ids and indices [..., Tq] and [..., Tk] -> [..., Tq, Tk]."""
    return visible(qi[..., :, None], ki[..., None, :], qs[..., :, None], ks[..., None, :], band)


def _softmax_attend(q, k, v, ok, scale):
    """q [..., Tq, H, D], k/v [..., Tk, H, D], ok [..., Tq, Tk] -> [..., Tq, H, D]; softmax in fp32.

    The two products run heads-major ([..., H, T, D], one transpose each way) and the softmax is normalised after
    the PV product (a [Tq, D] division instead of a [Tq, Tk] one): on XLA:CPU ~25% faster than einsums over the
    [..., T, H, D] layout (benchmarks/attention_core.py), the same function to fp32 rounding.
    """
    qh, kh, vh = (jnp.swapaxes(x, -3, -2) for x in (q, k, v))
    return jnp.swapaxes(_attend_heads_major(qh, kh, vh, ok[..., None, :, :], scale), -3, -2)


def _attend_heads_major(qh, kh, vh, ok, scale):
    """`_softmax_attend` on heads-major operands: qh [..., Tq, D], kh/vh [..., Tk, D] -> [..., Tq, D]; ok
    broadcasts against the scores [..., Tq, Tk]."""
    s = jnp.einsum("...qd,...kd->...qk", qh, kh, preferred_element_type=jnp.float32) * scale
    s = jnp.where(ok, s, _NEG_INF)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.matmul(e.astype(vh.dtype), vh, preferred_element_type=jnp.float32) / jnp.sum(e, axis=-1, keepdims=True)
    return o.astype(vh.dtype)


def reference_attention(q, k, v, *, q_seg, k_seg, band: Band, q_idx=None, k_idx=None):
    """Dense masked attention.

    q [B, Tq, H, D]; k, v [B, Tk, H, D]; q_seg [B, Tq]; k_seg [B, Tk] (segment ids: tokens attend only within
    their segment; 0 marks padding, -1 keys that do not exist); q_idx [B, Tq] / k_idx [B, Tk] are the indices the
    band is measured in (default: 0..T-1).
    """
    if q_idx is None:
        q_idx = jnp.arange(q.shape[1])[None]
    if k_idx is None:
        k_idx = jnp.arange(k.shape[1])[None]
    ok = _visible_pairs(q_seg, k_seg, q_idx, k_idx, band)
    return _softmax_attend(q, k, v, ok, 1.0 / math.sqrt(q.shape[-1]))


def cached_attention(q, k_cache, v_cache, *, q_seg, k_seg, band: Band, q_idx, k_idx):
    """Attention of new queries over a KV cache (incremental decoding).

    q [B, Tq, H, D]; k_cache, v_cache [B * H, S, D], the layout `model.init_cache` keeps: the products read the cache
    as it lies, so the cache is updated in place and never copied. (A [B, S, H, D] cache cost two transposing copies of
    every layer's cache per decoded token; a [B, H, S, D] one made XLA:CPU copy the loop-carried cache three times a
    step; either way a fifth of the 150m model's decoding time on CPU.) The masks and indices are as in
    `reference_attention`.
    """
    b, tq, h, d = q.shape
    ok = _visible_pairs(q_seg, k_seg, q_idx, k_idx, band)  # [B, Tq, S]
    qg = jnp.swapaxes(q, 1, 2).reshape(b * h, tq, d)
    o = _attend_heads_major(qg, k_cache, v_cache, jnp.repeat(ok, h, axis=0), 1.0 / math.sqrt(d))
    return jnp.swapaxes(o.reshape(b, h, tq, d), 1, 2)
