"""Attention in XLA without [T, T] scores (the CPU path of every layer the native kernel does not take):

  * `tiled_core` / `tiled_attention`: heads-major rows a cache-sized tile at a time (the scores, mask and softmax of a
    tile stay in L2), with a flash-attention style custom VJP that recomputes each tile's scores from the saved row
    max and sum: ~2x the dense path's speed on XLA:CPU and O(T) memory.
  * `blocked_attention`: sliding-window layers in O(T * w): queries in blocks of `block` against their own and the
    neighbouring key blocks only (through the tiled core).
  * `chunked_attention`: causal global layers, query chunks against the keys they can see (through the tiled core).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ettin_jax.attention import Band, _NEG_INF, _visible_pairs
from ettin_jax.kernels.platform import platform


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
    if platform() != "cpu":
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
        windowed = platform() == "cpu"
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
