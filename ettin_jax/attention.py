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


def _softmax_attend(q, k, v, ok, scale):
    """q [..., Tq, H, D], k/v [..., Tk, H, D], ok [..., Tq, Tk] -> [..., Tq, H, D]; softmax in fp32.

    The two products run heads-major ([..., H, T, D], one transpose each way) and the softmax is normalised after
    the PV product (a [Tq, D] division instead of a [Tq, Tk] one): on XLA:CPU ~25% faster than einsums over the
    [..., T, H, D] layout (benchmarks/attention_core.py), the same function to fp32 rounding.
    """
    qh, kh, vh = (jnp.swapaxes(x, -3, -2) for x in (q, k, v))
    s = jnp.matmul(qh, jnp.swapaxes(kh, -1, -2), preferred_element_type=jnp.float32) * scale  # [..., H, Tq, Tk]
    s = jnp.where(ok[..., None, :, :], s, _NEG_INF)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.matmul(e.astype(v.dtype), vh, preferred_element_type=jnp.float32) / jnp.sum(e, axis=-1, keepdims=True)
    return jnp.swapaxes(o.astype(v.dtype), -3, -2)


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


def chunked_attention(q, k, v, *, segment_ids, band: Band, chunk: int = 512, remat: bool = False):
    """Self-attention in query chunks, each against the static key range its band can reach.

    For a causal band a chunk of queries [s, e) needs keys [0, e) only, so the causal global layers cost about
    half of the dense [T, T] (the dense path computes and then masks the upper triangle). With `remat`, each
    chunk's scores are recomputed in the backward pass instead of kept: memory O(chunk * T) per layer rather than
    O(T^2), for long rows.
    """
    back, ahead = band
    b, t, h, d = q.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))

    def one(qc, kc, vc, qs, ks, qi, ki):
        ok = visible(qi[:, :, None], ki[:, None, :], qs[:, :, None], ks[:, None, :], band)
        return _softmax_attend(qc, kc, vc, ok, 1.0 / math.sqrt(d))

    if remat:
        # One chunk at a time in a scan: XLA:CPU schedules the recomputations of unrolled chunks side by side,
        # which brings the O(T^2) memory back (10 GB at 1 x 8192). Every chunk sees every key (the mask does the
        # rest), so the causal saving is traded for bounded memory on long rows.
        one = jax.checkpoint(one)
        n = -(-t // chunk)
        pad = n * chunk - t
        qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        sp = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-2)  # padded queries see nothing
        ip = jnp.broadcast_to(jnp.arange(n * chunk), (b, n * chunk))
        split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

        def body(_, xs):
            qc, qs, qi = xs
            return None, one(qc, k, v, qs, segment_ids, qi, idx)

        _, out = jax.lax.scan(body, None, (split(qp), split(sp), split(ip)))
        return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, d)[:, :t]
    outs = []
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        lo = 0 if back is None else max(0, s - back)
        hi = t if ahead is None else min(t, e + ahead)
        outs.append(one(q[:, s:e], k[:, lo:hi], v[:, lo:hi], segment_ids[:, s:e], segment_ids[:, lo:hi],
                        idx[:, s:e], idx[:, lo:hi]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


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


# Rows whose dense [B, H, T, T] fp32 scores would exceed this are chunked with recomputation in the backward pass.
REMAT_SCORE_BYTES = 256 * 2 ** 20


def self_attention(q, k, v, *, segment_ids, band: Band, impl: str = "auto", block: int = 64):
    """Training-time self-attention (queries and keys are the same packed rows), dispatched by platform.

    impl: 'auto' (see `resolve_impl`), 'xla' (always dense), 'blocked' (blocked wherever the band is bounded),
    'chunked' (query chunks against the keys the band reaches), 'cudnn' (GPU), 'splash' (TPU).
    """
    b, t, h, _ = q.shape
    impl = resolve_impl(impl, band, t, block=block)
    if impl == "blocked":
        return blocked_attention(q, k, v, segment_ids=segment_ids, band=band, block=block)
    if impl == "chunked":
        remat = b * h * t * t * 4 > REMAT_SCORE_BYTES
        if not remat and band[1] != 0:  # not causal: chunks would save nothing, one dense product
            return reference_attention(q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band)
        return chunked_attention(q, k, v, segment_ids=segment_ids, band=band, chunk=512 if remat else 256,
                                 remat=remat)
    if impl == "xla":
        return reference_attention(q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids=segment_ids, band=band)
    return splash_attention(q, k, v, segment_ids=segment_ids, band=band)
