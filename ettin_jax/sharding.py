"""The device mesh and the logical-axis rules that place parameters and activations on it.

The model names axes logically (`ettin_jax.model`); a rule table maps each logical name onto mesh axes
`data`, `fsdp`, `tensor`. Parameters are sharded over `fsdp` along their embedding dimension and over `tensor`
along heads / GLU width / vocabulary; the batch is split over `data` x `fsdp`. Changing the parallelism is changing
`config.mesh` (and, rarely, `config.sharding_rules`), never the model.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed_out", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves config.mesh.{data,fsdp,tensor} (one of them may be -1: fills the rest) against the device count."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: axis sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by "
                             f"the fixed axes' product {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Optional[Sequence] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def validate(model_cfg, mesh: Mesh, global_batch_size: int):
    """Clear errors, before compilation, for shapes the mesh cannot divide."""
    t = mesh.shape["tensor"]
    for what, n in (("num_heads", model_cfg.num_heads), ("intermediate_size (GLU width)",
                                                        model_cfg.intermediate_size)):
        if n % t:
            raise ValueError(f"the tensor axis ({t}) does not divide {what} ({n})")
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % dp:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by data x fsdp = "
                         f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {dp}")


def rules(config=None):
    extra = tuple(tuple(r) for r in (getattr(config, "sharding_rules", None) or ()))
    return extra + DEFAULT_RULES


def param_shardings(logical_specs, mesh: Mesh, rule_table=DEFAULT_RULES):
    """Logical PartitionSpec tree -> NamedSharding tree; axes the mesh cannot split evenly stay replicated."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rule_table)


def fit_shardings(shardings, shapes):
    """Drops mesh axes from dimensions they do not divide (e.g. a vocabulary not divisible by `tensor`)."""
    def fit(s, x):
        spec = list(s.spec) + [None] * (len(x.shape) - len(s.spec))
        for i, ax in enumerate(spec):
            if ax is None:
                continue
            axes = ax if isinstance(ax, tuple) else (ax,)
            if x.shape[i] % math.prod(s.mesh.shape[a] for a in axes):
                spec[i] = None
        return NamedSharding(s.mesh, P(*spec))
    return jax.tree_util.tree_map(fit, shardings, shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """This host's rows -> global jax.Arrays sharded over data x fsdp (works on one or many processes)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
