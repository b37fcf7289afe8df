"""Splash attention, the TPU Pallas kernel (Mosaic), under `jax.shard_map` on a mesh of several devices."""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ettin_jax.attention import Band
from ettin_jax.kernels.platform import platform


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


def padded_length(t: int, block: int = 512) -> int:
    """The row length splash runs a row of t tokens at: t rounded up to a multiple of its tile (`block`, or 128 for a
    row shorter than `block`). The kernel's tiles must divide the row, in multiples of 128; Ettin's long-context rows
    are 7999 tokens, which would otherwise leave no tile at all. Global layers (block 512) run 7999 as 8192 (+2.4% of
    attention work), sliding-window layers (block 128) as 8064."""
    unit = min(block, -(-t // 128) * 128)
    return -(-t // unit) * unit


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
    tp = padded_length(t, block)
    if tp != t:  # appended tokens get segment -1, used by no token of the row: nothing sees them or is seen by them
        q, k, v = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - t)), constant_values=-1)
    kernel = splash.make_splash_mha(splash_mask(band, tp, h), block_sizes=splash_block_sizes(tp, block),
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    scale = jnp.asarray(1.0 / math.sqrt(d), q.dtype)

    def one(qb, kb, vb, seg):  # [T, H, D] -> [H, T, D]; splash does not scale q itself
        o = kernel(jnp.swapaxes(qb * scale, 0, 1), jnp.swapaxes(kb, 0, 1), jnp.swapaxes(vb, 0, 1),
                   segment_ids=splash.SegmentIds(q=seg, kv=seg))
        return jnp.swapaxes(o, 0, 1)

    return jax.vmap(one)(q, k, v, segment_ids)[:, :t]


def splash_attention(q, k, v, *, segment_ids, band: Band, block: Optional[int] = None,
                     interpret: Optional[bool] = None):
    """TPU Pallas splash attention: the band as Full/Causal/LocalMask (blocks outside it are skipped), segment
    ids as `SegmentIds`; rows of any length, padded inside to `padded_length`. interpret=None runs the kernel in
    Pallas interpret mode unless the trace is for TPU devices (`kernels.platform`), e.g. the tests on CPU.

    On a mesh of more than one device the kernel runs inside `jax.shard_map` (see `splash_partition`): a Mosaic
    kernel cannot be partitioned by GSPMD (XLA raises "Mosaic kernels cannot be automatically partitioned"), so
    each device runs it on its own rows and heads, as MaxText does.

    block=None: 128 for sliding windows (a +-64 window touches 3 key tiles of 128 rather than 2 of 512), 512 for
    global layers.
    """
    if block is None:
        block = 128 if band[0] is not None and band[1] is not None else 512
    if interpret is None:
        interpret = platform() != "tpu"
    local = functools.partial(_splash_local, band=band, block=block, interpret=interpret)
    part = splash_partition(q.shape)
    if part is None:
        return local(q, k, v, segment_ids)
    mesh, qkv_spec, seg_spec = part
    # check_vma=False: pallas_call has no replication rule (MaxText passes check_rep=False likewise).
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)
