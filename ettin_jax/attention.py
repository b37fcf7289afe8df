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
  * `cpu_attention.attention`: RoPE and flash attention in one native kernel (forward and backward) from the Wqkv
    output, the CPU path of every layer where it applies: fp32, T a multiple of 64, one device, an AVX-512 CPU
    (called by the model's attention for impl 'auto').
  * `tiled_core` / `tiled_attention`: the XLA CPU path of every other layer. Heads-major rows a cache-sized tile at a time
    (the scores, mask and softmax of a tile stay in L2), with a flash-attention style custom VJP that recomputes
    each tile's scores from the saved row max and sum: ~2x the dense path's speed on XLA:CPU and O(T) memory.
  * `blocked_attention`: sliding-window layers in O(T * w): queries in blocks of `block` against their own and
    the neighbouring key blocks only (through the tiled core).
  * `chunked_attention`: causal global layers, query chunks against the keys they can see (through the tiled
    core).
  * `dot_product_attention` with implementation 'cudnn' on GPU (via `jax.nn.dot_product_attention`).
  * `splash_attention`: the TPU Pallas kernel; on a multi-device mesh inside `jax.shard_map` over the batch and
    head axes that the active logical-axis rules give the activations (`splash_partition`).
"""
from __future__ import annotations

import dataclasses
import functools
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


# --------------------------------------------------------------------- the tiled core (CPU and any XLA backend)

# Bytes of fp32 scores one step of the tiled core works on: small enough to stay in the CPU's L2 (2 MB per core
# here) while the mask, softmax and both products pass over them; measured best at 2-8 MB (docs/perf.md).
TILE_BYTES = 4 * 2 ** 20
# Rows longer than TILE_BYTES allows for MIN_TILE_QUERIES queries get a larger tile: with fewer queries the tile's
# [tq, 64] x [64, T] products are too thin (17m MLM 1 x 8192 step: 128 queries 7.36 s, 256 7.17 s, 512 7.13 s).
MIN_TILE_QUERIES = 256


def tile_budget(tile_bytes: Optional[int] = None, row_keys: int = 0) -> int:
    """The tile budget: as given, else TILE_BYTES on CPU (at least MIN_TILE_QUERIES queries against `row_keys` keys)
    and no tiling elsewhere (a GPU wants one large batched product, not a loop of cache-sized ones; the tiled core is
    the CPU path, accelerators use cuDNN or splash)."""
    if tile_bytes is not None:
        return tile_bytes
    if jax.default_backend() != "cpu":
        return 2 ** 62
    return max(TILE_BYTES, MIN_TILE_QUERIES * row_keys * 4)


def _tile_forward(q, k, v, qs, ks, qi, ki, band, scale):
    """One tile: q [G, tq, D] against k, v [G, Tk, D] -> out [G, tq, D], row max and row sum [G, tq]."""
    s = jnp.einsum("gqd,gkd->gqk", q * scale, k, preferred_element_type=jnp.float32)  # scaled as [tq, D]
    s = jnp.where(_visible_pairs(qs, ks, qi, ki, band), s, _NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("gqk,gkd->gqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return o.astype(v.dtype), m[..., 0], l[..., 0]


def _tile_backward(q, k, v, qs, ks, qi, ki, delta, m, l, do, band, scale):
    """Gradients of one tile, its probabilities recomputed from the saved row max and sum (flash-attention style).

    delta [G, tq] is rowsum(dO * O), computed once for all rows by the caller (flash attention's preprocessing
    step) rather than inside every tile.
    """
    ok = _visible_pairs(qs, ks, qi, ki, band)
    q = q * scale  # the scale applied to [tq, D] operands, not to the [tq, Tk] scores and their gradient
    s = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32)
    # exp(s - m) / l as one exponential (l >= 1: the row max contributes 1). m first: a row that sees no key has
    # m = _NEG_INF, which would swallow log(l).
    p = jnp.exp(jnp.where(ok, s, _NEG_INF) - m[..., None] - jnp.log(l)[..., None])
    do32 = do.astype(jnp.float32)
    dv = jnp.einsum("gqk,gqd->gkd", p, do32)
    dp = jnp.einsum("gqd,gkd->gqk", do32, v.astype(jnp.float32))
    ds = jnp.where(ok, p * (dp - delta[..., None]), 0.0)
    dq = jnp.einsum("gqk,gkd->gqd", ds, k.astype(jnp.float32)) * scale
    dk = jnp.einsum("gqk,gqd->gkd", ds, q.astype(jnp.float32))
    return dq, dk, dv


def _delta(o, do):  # [N, T, D] x2 -> rowsum(dO * O) [N, T], fp32
    return jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)


def _group_size(n: int, row_bytes: int, tile_bytes: int) -> int:
    """How many of n rows one tile takes: as many as fit in tile_bytes (at least one), dividing n."""
    g = max(1, min(n, tile_bytes // row_bytes))
    while n % g:
        g -= 1
    return g


def _groups(x, g):  # [N, ...] -> [N / g, g, ...]
    return x.reshape(x.shape[0] // g, g, *x.shape[1:])


def _qtiles(x, tq):  # [g, Tq, ...] -> [Tq / tq, g, tq, ...]
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // tq, tq, *x.shape[2:]), 1, 0)


def _untile(x):  # inverse of _qtiles
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _tiled(q, k, v, qs, ks, qi, ki, band, scale, g, tq):
    return _tiled_fwd(q, k, v, qs, ks, qi, ki, band, scale, g, tq)[0]


def _tiled_fwd(q, k, v, qs, ks, qi, ki, band, scale, g, tq):
    def group(args):
        gq, gk, gv, gqs, gks, gqi, gki = args
        if tq == gq.shape[1]:
            return _tile_forward(gq, gk, gv, gqs, gks, gqi, gki, band, scale)
        tiles = jax.lax.map(lambda a: _tile_forward(a[0], gk, gv, a[1], gks, a[2], gki, band, scale),
                            (_qtiles(gq, tq), _qtiles(gqs, tq), _qtiles(gqi, tq)))
        return tuple(_untile(x) for x in tiles)

    o, m, l = jax.lax.map(group, tuple(_groups(x, g) for x in (q, k, v, qs, ks, qi, ki)))
    o, m, l = o.reshape(q.shape), m.reshape(q.shape[:2]), l.reshape(q.shape[:2])
    return o, (q, k, v, qs, ks, qi, ki, o, m, l)


def _tiled_bwd(band, scale, g, tq, res, do):
    q, k, v, qs, ks, qi, ki, o, m, l = res
    delta = _delta(o, do)

    def group(args):
        gq, gk, gv, gqs, gks, gqi, gki, gdelta, gm, gl, gdo = args
        if tq == gq.shape[1]:
            return _tile_backward(gq, gk, gv, gqs, gks, gqi, gki, gdelta, gm, gl, gdo, band, scale)

        def tile(acc, a):  # keys and values gather their gradients over the query tiles
            dq, dk, dv = _tile_backward(a[0], gk, gv, a[1], gks, a[2], gki, a[3], a[4], a[5], a[6], band, scale)
            return (acc[0] + dk, acc[1] + dv), dq

        zeros = jnp.zeros(gk.shape, jnp.float32)
        tiles = tuple(_qtiles(x, tq) for x in (gq, gqs, gqi, gdelta, gm, gl, gdo))
        (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros), tiles)
        return _untile(dq), dk, dv

    dq, dk, dv = jax.lax.map(group, tuple(_groups(x, g) for x in (q, k, v, qs, ks, qi, ki, delta, m, l, do)))
    return (dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
            dv.reshape(v.shape).astype(v.dtype), None, None, None, None)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _heads_major(x):  # [..., T, H, D] -> [prod(...) * H, T, D]
    x = jnp.swapaxes(x, -3, -2)
    return x.reshape(-1, *x.shape[-2:])


def _per_head(x, h):  # [..., T] -> [prod(...) * H, T]
    x = x.reshape(-1, x.shape[-1])
    return jnp.broadcast_to(x[:, None], (x.shape[0], h, x.shape[1])).reshape(-1, x.shape[-1])


def tiled_core(qh, kh, vh, qs, ks, qi, ki, *, band: Band, tile_bytes: Optional[int] = None):
    """Masked softmax attention over heads-major rows, one cache-sized tile at a time.

    qh [N, Tq, D], kh/vh [N, Tk, D]; qs/qi [N, Tq] and ks/ki [N, Tk] are the segment ids and indices the mask is
    computed from (`visible`). The N rows are taken g at a time (and the queries tq at a time when one row's
    [Tq, Tk] scores exceed `tile_bytes`), so the scores, their mask, exponentials and gradients stay in cache; the
    backward pass recomputes each tile's scores from the saved row max and sum instead of storing [Tq, Tk].
    """
    n, t_q, d = qh.shape
    t_k = kh.shape[1]
    tile_bytes = tile_budget(tile_bytes, t_k)
    row = t_q * t_k * 4
    if row <= tile_bytes:
        tq, g = t_q, _group_size(n, row, tile_bytes)
    else:
        g, tq = 1, max(8, (tile_bytes // (t_k * 4)) // 8 * 8)
    pad = -t_q % tq
    if pad:  # padded queries see no key (segment -2 never matches) and are cut off again
        qh = jnp.pad(qh, ((0, 0), (0, pad), (0, 0)))
        qs = jnp.pad(qs, ((0, 0), (0, pad)), constant_values=-2)
        qi = jnp.pad(qi, ((0, 0), (0, pad)))
    out = _tiled(qh, kh, vh, qs, ks, qi, ki, band, 1.0 / math.sqrt(d), g, min(tq, t_q + pad))
    return out[:, :t_q]


def tiled_attention(q, k, v, *, q_seg, k_seg, band: Band, q_idx=None, k_idx=None,
                    tile_bytes: Optional[int] = None):
    """`reference_attention`'s function (same arguments, any leading dims) through `tiled_core`."""
    *lead, t_q, h, d = q.shape
    t_k = k.shape[-3]
    if q_idx is None:
        q_idx = jnp.broadcast_to(jnp.arange(t_q), q_seg.shape)
    if k_idx is None:
        k_idx = jnp.broadcast_to(jnp.arange(t_k), k_seg.shape)
    o = tiled_core(_heads_major(q), _heads_major(k), _heads_major(v), _per_head(q_seg, h), _per_head(k_seg, h),
                   _per_head(q_idx, h), _per_head(k_idx, h), band=band, tile_bytes=tile_bytes)
    return jnp.swapaxes(o.reshape(*lead, h, t_q, d), -3, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _windowed(q, k, v, seg, band, scale, g, tq):
    return _windowed_fwd(q, k, v, seg, band, scale, g, tq)[0]


def _window_keys(k, v, seg, band, tq):
    """The arrays query tiles' key windows are sliced from, and `window`, which slices tile i's.

    Rows at least one window long are used as they are, each window clamped into the row (the mask drops the keys
    a clamped window adds); shorter rows are padded by the band's reach on both sides (padding is segment -1).
    `window(i, gk, gv, gs)` gives where tile i's window starts, that window of a group's keys, values and segment
    ids, and the tile's query and key indices.
    """
    back, ahead = band
    t = k.shape[1]
    width = tq + back + ahead
    if t >= width:
        kidx, start = jnp.arange(t), lambda i: jnp.clip(i * tq - back, 0, t - width)
    else:
        k, v = (jnp.pad(x, ((0, 0), (back, ahead), (0, 0))) for x in (k, v))
        seg = jnp.pad(seg, ((0, 0), (back, ahead)), constant_values=-1)
        kidx, start = jnp.arange(-back, t + ahead), lambda i: i * tq

    def window(i, gk, gv, gs):
        w = start(i)
        rows = gk.shape[0]
        qi = jnp.broadcast_to(i * tq + jnp.arange(tq), (rows, tq))
        ki = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(kidx, w, width), (rows, width))
        return w, _window(gk, w, width), _window(gv, w, width), _window(gs, w, width), qi, ki

    return k, v, seg, window


def _window(x, start, width):  # [g, T', ...] -> [g, width, ...]
    return jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)


def _windowed_fwd(q, k, v, seg, band, scale, g, tq):
    kp, vp, sp, window = _window_keys(k, v, seg, band, tq)
    nq = q.shape[1] // tq

    def group(args):
        gq, gkp, gvp, gs, gsp = args

        def tile(a):
            i, qt, qst = a
            _, kt, vt, kst, qi, ki = window(i, gkp, gvp, gsp)
            return _tile_forward(qt, kt, vt, qst, kst, qi, ki, band, scale)

        return tuple(_untile(x) for x in jax.lax.map(tile, (jnp.arange(nq), _qtiles(gq, tq), _qtiles(gs, tq))))

    o, m, l = jax.lax.map(group, tuple(_groups(x, g) for x in (q, kp, vp, seg, sp)))
    o, m, l = o.reshape(q.shape), m.reshape(q.shape[:2]), l.reshape(q.shape[:2])
    return o, (q, k, v, seg, o, m, l)


def _windowed_bwd(band, scale, g, tq, res, do):
    q, k, v, seg, o, m, l = res
    delta = _delta(o, do)
    t = k.shape[1]
    kp, vp, sp, window = _window_keys(k, v, seg, band, tq)
    lo = 0 if kp.shape[1] == t else band[0]  # where the row starts in the (maybe padded) keys
    nq = q.shape[1] // tq

    def group(args):
        gq, gkp, gvp, gs, gsp, gdelta, gm, gl, gdo = args

        def tile(acc, a):  # each key gathers its gradient from the (overlapping) windows that contain it
            i, qt, qst, deltat, mt, lt, dot = a
            w, kt, vt, kst, qi, ki = window(i, gkp, gvp, gsp)
            dq, dk, dv = _tile_backward(qt, kt, vt, qst, kst, qi, ki, deltat, mt, lt, dot, band, scale)
            acc = tuple(jax.lax.dynamic_update_slice_in_dim(a_, _window(a_, w, d.shape[1]) + d, w, axis=1)
                        for a_, d in zip(acc, (dk, dv)))
            return acc, dq

        zeros = jnp.zeros(gkp.shape, jnp.float32)
        tiles = tuple(_qtiles(x, tq) for x in (gq, gs, gdelta, gm, gl, gdo))
        (dkp, dvp), dq = jax.lax.scan(tile, (zeros, zeros), (jnp.arange(nq),) + tiles)
        return _untile(dq), dkp[:, lo:lo + t], dvp[:, lo:lo + t]

    dq, dk, dv = jax.lax.map(group, tuple(_groups(x, g) for x in (q, kp, vp, seg, sp, delta, m, l, do)))
    return (dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
            dv.reshape(v.shape).astype(v.dtype), None)


_windowed.defvjp(_windowed_fwd, _windowed_bwd)


def blocked_attention(q, k, v, *, segment_ids, band: Band, block: int = 64, tile_bytes: Optional[int] = None,
                      windowed: Optional[bool] = None):
    """Self-attention for a bounded band at O(T * (block + reach)) cost.

    Queries are cut into tiles of `block` rows; tile i sees only a window of block + back + ahead keys around
    [i * block - back, (i + 1) * block + ahead).

    windowed (default: on CPU): the windows are sliced out of the keys inside a loop over the tiles (in cache)
    rather than materialised; rows are taken heads-major, as many at a time as `tile_bytes` of scores allows; the
    backward pass recomputes each tile (flash-attention style, as `tiled_core`) and adds each window's key
    gradients into place. Otherwise (GPU: one batched product rather than a loop) every block's neighbour blocks
    are materialised (the band may reach at most one block) and all blocks go through `tiled_core` at once.
    """
    back, ahead = band
    if back is None or ahead is None:
        raise ValueError(f"blocked_attention needs a bounded band, got {band}")
    if windowed is None:
        windowed = jax.default_backend() == "cpu"
    b, t, h, d = q.shape
    pad = -t % block
    qh, kh, vh = (jnp.pad(_heads_major(x), ((0, 0), (0, pad), (0, 0))) for x in (q, k, v))
    seg = jnp.pad(_per_head(segment_ids, h), ((0, 0), (0, pad)), constant_values=-1)
    if windowed:
        g = _group_size(qh.shape[0], block * (block + back + ahead) * 4, tile_budget(tile_bytes))
        o = _windowed(qh, kh, vh, seg, (back, ahead), 1.0 / math.sqrt(d), g, block)
    else:
        o = _neighbour_blocks(qh, kh, vh, seg, band, block, tile_bytes)
    return jnp.swapaxes(o.reshape(b, h, t + pad, d), 1, 2)[:, :t]


def _neighbour_blocks(qh, kh, vh, seg, band: Band, block: int, tile_bytes: Optional[int]):
    """Heads-major rows [N, T, D] (T a multiple of block): each block against its own and neighbouring key blocks,
    materialised, through `tiled_core`."""
    back, ahead = band
    if max(back, ahead) > block:
        raise ValueError(f"band {band} reaches beyond one block of {block}")
    n = qh.shape[1] // block
    idx = jnp.broadcast_to(jnp.arange(qh.shape[1]), seg.shape)
    shifts = ([-1] if back > 0 else []) + [0] + ([1] if ahead > 0 else [])

    def blocks(x):  # [N, n*block, ...] -> [N * n, block, ...]
        return x.reshape(x.shape[0] * n, block, *x.shape[2:])

    def neighbours(x, fill):  # [N, n*block, ...] -> [N * n, len(shifts)*block, ...]
        x = x.reshape(x.shape[0], n, block, *x.shape[2:])
        parts = []
        for s in shifts:
            if s == 0:
                parts.append(x)
            else:
                widths = [(0, 0)] * x.ndim
                widths[1] = (1, 0) if s < 0 else (0, 1)
                xp = jnp.pad(x, widths, constant_values=fill)
                parts.append(xp[:, :-1] if s < 0 else xp[:, 1:])
        x = jnp.concatenate(parts, axis=2)
        return x.reshape(x.shape[0] * n, *x.shape[2:])

    o = tiled_core(blocks(qh), neighbours(kh, 0), neighbours(vh, 0), blocks(seg), neighbours(seg, -1), blocks(idx),
                   neighbours(idx, -(10**9)), band=band, tile_bytes=tile_bytes)
    return o.reshape(qh.shape)


def chunked_attention(q, k, v, *, segment_ids, band: Band, chunk: int = 256, tile_bytes: Optional[int] = None):
    """Self-attention in query chunks, each against the static key range its band can reach.

    For a causal band a chunk of queries [s, e) needs keys [0, e) only, so the causal global layers cost about
    half of the dense [T, T] (the dense path computes and then masks the upper triangle). Each chunk goes through
    `tiled_core`, so no layer ever holds its [T, T] scores: memory is O(T) per layer at any row length.
    """
    back, ahead = band
    b, t, h, d = q.shape
    qh, kh, vh = _heads_major(q), _heads_major(k), _heads_major(v)
    seg = _per_head(segment_ids, h)
    idx = jnp.broadcast_to(jnp.arange(t), seg.shape)
    outs = []
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        lo = 0 if back is None else max(0, s - back)
        hi = t if ahead is None else min(t, e + ahead)
        outs.append(tiled_core(qh[:, s:e], kh[:, lo:hi], vh[:, lo:hi], seg[:, s:e], seg[:, lo:hi], idx[:, s:e],
                               idx[:, lo:hi], band=band, tile_bytes=tile_bytes))
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return jnp.swapaxes(o.reshape(b, h, t, d), 1, 2)


def cudnn_arguments(segment_ids, band: Band) -> Optional[dict]:
    """Keyword arguments of `jax.nn.dot_product_attention` that express (segment_ids, band), or None.

    cuDNN takes a causal mask, a left window (sliding_window_length, only together with the causal mask) and an
    explicit boolean mask; the segment ids become that mask ([B, 1, T, T]). A bidirectional bounded band (the
    encoder's local layers) has a right window cuDNN cannot take: None, and the caller uses `blocked_attention`.
    The same arguments mean the same thing to implementation='xla', which is how they are tested on CPU.
    """
    back, ahead = band
    args = dict(mask=segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if ahead is None and back is None:
        return args
    if ahead == 0:
        args["is_causal"] = True
        if back is not None:
            args["local_window_size"] = (back, 0)
        return args
    return None


def cudnn_attention(q, k, v, *, segment_ids, band: Band, implementation: str = "cudnn"):
    """Attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU)."""
    args = cudnn_arguments(segment_ids, band)
    if args is None:
        raise ValueError(f"cuDNN cannot express the band {band} (a right window without the causal mask); "
                         "use blocked_attention")
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **args)


def splash_mask(band: Band, t: int, num_heads: int):
    """The splash-attention mask object of a band over a [t, t] self-attention (one per head)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    back, ahead = band
    if back is None and ahead is None:
        m = splash.FullMask((t, t))
    elif back is None and ahead == 0:
        m = splash.CausalMask((t, t))
    else:
        m = splash.LocalMask((t, t), (back, ahead), offset=0)
    return splash.MultiHeadMask([m] * num_heads)


def splash_block_sizes(t: int, block: int = 512):
    """Splash tile sizes: `block` (the largest multiple of 128 dividing t, at most `block`) everywhere."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    bs = min(block, t)
    while t % bs:
        bs //= 2
    return splash.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                             block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)


# The logical axes of q, k, v [B, T, H, D] (the model constrains q and k to them); `splash_attention` resolves them
# through the active flax logical-axis rules to find how the batch and the heads are split over the mesh.
QKV_AXES = ("act_batch", "act_length", "act_heads", None)


def _mesh_axes(entry, mesh) -> tuple[str, ...]:
    """A PartitionSpec entry (None, an axis, or a tuple of axes) -> the axes of it that split anything (size > 1)."""
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def splash_partition(shape) -> Optional[tuple]:
    """How `splash_attention` splits q, k, v of `shape` [B, T, H, D] over the active mesh, or None (one device).

    Reads the mesh set by `jax.set_mesh` (`jax.sharding.get_abstract_mesh()`) and the logical-axis rules set by
    `flax.linen.logical_axis_rules`, both active while the train step is traced, so the model never names a device
    axis. Returns (mesh, qkv spec, segment-ids spec): the batch over the mesh axes `act_batch` maps to, the heads over
    those of `act_heads`. The sequence is never split inside the kernel: where `act_length` maps to a `sequence` axis
    > 1, the shard_map's input spec gathers the rows whole (each sequence shard computes the full attention of its
    rows and heads: correct, but no saving from that axis in the attention op).
    """
    from jax.sharding import PartitionSpec as P
    import flax.linen as nn
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    b, _, h, _ = shape
    spec = nn.logical_to_mesh_axes(QKV_AXES) or P(None, None, None, None)
    batch, heads = _mesh_axes(spec[0], mesh), _mesh_axes(spec[2], mesh)
    for what, n, axes in (("batch", b, batch), ("heads", h, heads)):
        k = math.prod(mesh.shape[a] for a in axes)
        if n % k:
            raise ValueError(f"splash attention: the {what} ({n}) is not divisible by the mesh axes {axes} it is "
                             f"sharded over (product {k}); make it a multiple of {k}")
    batch, heads = (batch or None), (heads or None)
    return mesh, P(batch, None, heads, None), P(batch, None)


def _splash_local(q, k, v, segment_ids, *, band: Band, block: int, interpret: bool):
    """The splash kernel on one device's q, k, v [b, T, h, D] (whole rows; splash's own layout is [h, T, D])."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    b, t, h, d = q.shape
    kernel = splash.make_splash_mha(splash_mask(band, t, h), block_sizes=splash_block_sizes(t, block),
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    scale = jnp.asarray(1.0 / math.sqrt(d), q.dtype)

    def one(qb, kb, vb, seg):  # [T, H, D] -> [H, T, D]; splash does not scale q itself
        o = kernel(jnp.swapaxes(qb * scale, 0, 1), jnp.swapaxes(kb, 0, 1), jnp.swapaxes(vb, 0, 1),
                   segment_ids=splash.SegmentIds(q=seg, kv=seg))
        return jnp.swapaxes(o, 0, 1)

    return jax.vmap(one)(q, k, v, segment_ids)


def splash_attention(q, k, v, *, segment_ids, band: Band, block: Optional[int] = None,
                     interpret: Optional[bool] = None):
    """TPU Pallas splash attention: the band as Full/Causal/LocalMask (blocks outside it are skipped), segment
    ids as `SegmentIds`. interpret=None runs the kernel in Pallas interpret mode off TPU (tests on CPU).

    On a mesh of more than one device the kernel runs inside `jax.shard_map` (see `splash_partition`): a Mosaic
    kernel cannot be partitioned by GSPMD (XLA raises "Mosaic kernels cannot be automatically partitioned"), so
    each device runs it on its own rows and heads, as MaxText does.

    block=None: 128 for sliding windows (a +-64 window touches 3 key tiles of 128 rather than 2 of 512), 512 for
    global layers.
    """
    if block is None:
        block = 128 if band[0] is not None and band[1] is not None else 512
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    local = functools.partial(_splash_local, band=band, block=block, interpret=interpret)
    part = splash_partition(q.shape)
    if part is None:
        return local(q, k, v, segment_ids)
    mesh, qkv_spec, seg_spec = part
    # check_vma=False: pallas_call has no replication rule (MaxText passes check_rep=False likewise).
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)


IMPLEMENTATIONS = ("auto", "xla", "blocked", "chunked", "cudnn", "splash")


def resolve_impl(impl: str, band: Band, t: int, *, block: int = 64, platform: Optional[str] = None) -> str:
    """The implementation one layer uses.

    auto: TPU -> splash (rows a multiple of 128) for every layer; GPU -> cuDNN, except bidirectional
    sliding-window layers (cuDNN has no right window) which go blocked; CPU -> blocked for sliding-window layers
    of rows longer than two blocks, query-chunked for the rest. 'cudnn' and 'blocked' likewise fall back where
    they cannot express a band.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
    bounded = band[0] is not None and band[1] is not None
    if impl == "auto":
        platform = platform or jax.default_backend()
        if platform == "tpu" and t % 128 == 0:
            return "splash"
        if platform == "gpu":
            impl = "cudnn"
        else:
            return "blocked" if bounded and t > 2 * block else "chunked"
    if impl == "cudnn" and (band[1] not in (None, 0)):
        return "blocked" if t > 2 * block else "xla"
    if impl == "blocked" and not bounded:
        return "xla"
    return impl


def self_attention(q, k, v, *, segment_ids, band: Band, impl: str = "auto", block: int = 64):
    """Training-time self-attention (queries and keys are the same packed rows), dispatched by platform.

    impl: 'auto' (see `resolve_impl`), 'xla' (always dense), 'blocked' (blocked wherever the band is bounded),
    'chunked' (the tiled core; causal bands in query chunks against the keys they reach), 'cudnn' (GPU), 'splash'
    (TPU).
    """
    impl = resolve_impl(impl, band, q.shape[1], block=block)
    if impl == "blocked":
        return blocked_attention(q, k, v, segment_ids=segment_ids, band=band, block=block)
    if impl == "chunked":
        if band[1] != 0:  # not causal: query chunks would skip no keys; one tiled call
            return tiled_attention(q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band)
        return chunked_attention(q, k, v, segment_ids=segment_ids, band=band)
    if impl == "xla":
        return reference_attention(q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids=segment_ids, band=band)
    return splash_attention(q, k, v, segment_ids=segment_ids, band=band)
