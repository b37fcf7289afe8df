"""Attention masks and the attention op: the one place where encoder and decoder differ.

A `Mask` is the value that turns the shared ModernBERT stack into an encoder (bidirectional) or a decoder
(causal). Every attention call reduces to a *band* `(back, ahead)`: key k is visible from query q iff
`-ahead <= q - k <= back` (None = unbounded), both tokens are in the same packed document (segment id), and
the key exists. Global layers use the mask's unbounded band, local (sliding-window) layers a bounded one:

    encoder, global:  (None, None)        encoder, local: (w, w)       w = local_attention // 2 = 64, 129 keys
    decoder, global:  (None, 0)           decoder, local: (k - 1, 0)   k keys including the query itself

The decoder's window defaults to Hugging Face ModernBertDecoder's semantics (k = local_attention // 2 = 64 keys),
so exported models behave identically there; Ettin's training code saw 65 keys (`decoder_window=65`).

Implementations (all computing the same function, tested against `reference_attention`):
  * `reference_attention`: dense [T, S] scores; the ground truth, also used for KV-cache decoding.
  * `blocked_attention`: sliding-window layers in O(T * w): queries in blocks of `block` against their own and
    the neighbouring key blocks only.
  * `dot_product_attention` with implementation 'cudnn' on GPU (via `jax.nn.dot_product_attention`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
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


def _softmax_attend(q, k, v, ok, scale):
    """q [..., Tq, H, D], k/v [..., Tk, H, D], ok [..., Tq, Tk] -> [..., Tq, H, D]; softmax in fp32."""
    s = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(ok[..., None, :, :], s, _NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", p, v)


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
    ok = visible(q_idx[:, :, None], k_idx[:, None, :], q_seg[:, :, None], k_seg[:, None, :], band)
    return _softmax_attend(q, k, v, ok, 1.0 / math.sqrt(q.shape[-1]))


def blocked_attention(q, k, v, *, segment_ids, band: Band, block: int = 64):
    """Self-attention for a bounded band at O(T * block) cost.

    Queries are cut into blocks of `block`; each block sees its own key block and the neighbouring ones the band
    can reach (one behind if back > 0, one ahead if ahead > 0), so `block` must be at least the band's reach.
    """
    back, ahead = band
    if back is None or ahead is None:
        raise ValueError(f"blocked_attention needs a bounded band, got {band}")
    if max(back, ahead) > block:
        raise ValueError(f"band {band} reaches beyond one block of {block}")
    b, t, h, d = q.shape
    n = -(-t // block)
    pad = n * block - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    idx = jnp.broadcast_to(jnp.arange(n * block), (b, n * block))

    def blocks(x):  # [B, n*block, ...] -> [B, n, block, ...]
        return x.reshape(b, n, block, *x.shape[2:])

    shifts = ([-1] if back > 0 else []) + [0] + ([1] if ahead > 0 else [])

    def neighbours(x, fill):  # [B, n, block, ...] -> [B, n, len(shifts)*block, ...]
        parts = []
        for s in shifts:
            if s == 0:
                parts.append(x)
            else:
                widths = [(0, 0)] * x.ndim
                widths[1] = (1, 0) if s < 0 else (0, 1)
                xp = jnp.pad(x, widths, constant_values=fill)
                parts.append(xp[:, :-1] if s < 0 else xp[:, 1:])
        return jnp.concatenate(parts, axis=2)

    qb = blocks(q)
    kb, vb = neighbours(blocks(k), 0), neighbours(blocks(v), 0)
    qs, ks = blocks(segment_ids), neighbours(blocks(segment_ids), -1)
    qi, ki = blocks(idx), neighbours(blocks(idx), -(10**9))
    ok = visible(qi[..., :, None], ki[..., None, :], qs[..., :, None], ks[..., None, :], band)
    out = _softmax_attend(qb, kb, vb, ok, 1.0 / math.sqrt(d))
    return out.reshape(b, n * block, h, d)[:, :t]


def _cudnn_attention(q, k, v, *, segment_ids, band: Band):
    back, ahead = band
    seg = segment_ids
    mask = (seg[:, None, :, None] == seg[:, None, None, :])
    window = None if back is None and ahead is None else (
        back if back is not None else q.shape[1], ahead if ahead is not None else q.shape[1])
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=False, local_window_size=window, implementation="cudnn")


def self_attention(q, k, v, *, segment_ids, band: Band, impl: str = "auto", block: int = 64):
    """Training-time self-attention (queries and keys are the same packed rows), dispatched by platform.

    impl: 'auto' (blocked for sliding-window layers of rows longer than two blocks, dense otherwise),
    'xla' (always dense), 'blocked' (blocked wherever the band is bounded), 'cudnn' (GPU).
    Global layers (unbounded band) always take the dense or cuDNN path.
    """
    bounded = band[0] is not None and band[1] is not None
    if impl == "auto":
        impl = "blocked" if bounded and q.shape[1] > 2 * block else "xla"
    if impl == "blocked":
        impl = "blocked" if bounded else "xla"
    if impl == "blocked":
        return blocked_attention(q, k, v, segment_ids=segment_ids, band=band, block=block)
    if impl == "xla":
        return reference_attention(q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, segment_ids=segment_ids, band=band)
    raise ValueError(f"unknown attention implementation {impl!r}; expected auto, xla, blocked or cudnn")
