"""The device mesh, multi-host start-up, and the logical-axis rules that place parameters and activations on it.

The model names axes logically (`ettin_jax.model`); a rule table maps each logical name onto the mesh axes
`data`, `fsdp`, `sequence`, `tensor`. Parameters are sharded over `fsdp` along their embedding dimension and over
`tensor` along heads / GLU width / vocabulary; the batch is split over `data` x `fsdp` and, for long contexts, the
sequence over `sequence`. Changing the parallelism is changing `config.mesh` (and, rarely, `config.sharding_rules`),
never the model:

    config.mesh.{data,fsdp,sequence,tensor}   axis sizes within a slice (one may be -1: fills the rest;
                                              `sequence` is optional, default 1)
    config.mesh.dcn_{data,fsdp,...}           optional multi-slice factors (default 1): the axis spans slices over
                                              the data-centre network; its full size is ICI size x DCN size
    config.mesh.num_devices                   optional, default -1 (all): use only the first N devices

Multi-host: `initialize_distributed` starts `jax.distributed` from flags, from JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, or by JAX's auto-detection on TPU VM pod slices and SLURM.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Outer to inner: the innermost axes get the nearest devices (tensor parallelism talks the most).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed_out", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def _get(mesh_cfg, key, default):
    try:
        value = mesh_cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else int(value)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves config.mesh.{data,fsdp,sequence,tensor} (one may be -1: fills the rest) against a device count.

    Returns the sizes in MESH_AXES order. `num_devices` is the number of devices of one slice when the mesh spans
    several (see `make_mesh`).
    """
    sizes = [_get(mesh_cfg, a, 1) for a in MESH_AXES]
    shown = lambda: ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh ({shown()}): at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh ({shown()}): axis sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh ({shown()}): {num_devices} devices are not divisible by the fixed axes' "
                             f"product {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh ({shown()}) has {math.prod(sizes)} devices, but {num_devices} are available; make "
                         f"the product {num_devices} (or set one axis to -1)")
    return tuple(sizes)


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
    """The multi-slice factors config.mesh.dcn_{axis} (default 1), in MESH_AXES order."""
    sizes = tuple(_get(mesh_cfg, f"dcn_{a}", 1) for a in MESH_AXES)
    if any(s < 1 for s in sizes):
        raise ValueError(f"mesh dcn sizes {dict(zip(MESH_AXES, sizes))} must be positive")
    return sizes


def select_devices(mesh_cfg, devices: Optional[Sequence] = None) -> list:
    """All devices, or the first config.mesh.num_devices of them (tests run a 1-device mesh in an 8-device
    process)."""
    devices = list(jax.devices() if devices is None else devices)
    n = _get(mesh_cfg, "num_devices", -1)
    if n == -1:
        return devices
    if not 0 < n <= len(devices):
        raise ValueError(f"mesh.num_devices={n}, but {len(devices)} devices exist; use 1..{len(devices)} or -1 "
                         "(all)")
    if n != len(devices) and jax.process_count() > 1:
        raise ValueError(f"mesh.num_devices={n} of {len(devices)}: with {jax.process_count()} processes every "
                         "device must be in the mesh (each process feeds its own devices); use -1")
    return devices[:n]


def make_mesh(mesh_cfg, devices: Optional[Sequence] = None) -> Mesh:
    """The training mesh (axes MESH_AXES, GSPMD auto mode) from config.mesh.

    With dcn_* factors > 1 the mesh is hybrid: each slice holds an ICI mesh of the configured sizes and the slices
    are laid out along the DCN axes (`mesh_utils.create_hybrid_device_mesh`), so only the axes named dcn_* cross
    the slower network: put `data` (or `fsdp`) there, never `tensor`.
    """
    devices = select_devices(mesh_cfg, devices)
    dcn = dcn_shape(mesh_cfg)
    n_slices = math.prod(dcn)
    if len(devices) % n_slices:
        raise ValueError(f"mesh dcn sizes {dict(zip(MESH_AXES, dcn))} ask for {n_slices} slices, which do not "
                         f"divide the {len(devices)} devices")
    ici = mesh_shape(mesh_cfg, len(devices) // n_slices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if n_slices == 1:
        return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils
    # Slices are TPU slices (slice_index); elsewhere (GPU nodes, CPU processes) each process is one granule. Not
    # `hasattr(d, "slice_index")`: multi-process CPU devices carry slice_index 0 on every process.
    by_process = devices[0].platform != "tpu"
    found = len({d.process_index if by_process else d.slice_index for d in devices})
    if found != n_slices:
        raise ValueError(f"mesh dcn sizes {dict(zip(MESH_AXES, dcn))} ask for {n_slices} slices, but the "
                         f"{len(devices)} devices are in {found} "
                         f"{'process(es) (slices off TPU)' if by_process else 'TPU slice(s)'}; make the "
                         f"product of the dcn_* sizes {found} (1 on a single slice: put its axes in "
                         "config.mesh.{data,fsdp,...})")
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                 allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def validate(model_cfg, mesh: Mesh, global_batch_size: int, *, seq_len: Optional[int] = None,
             micro_batch_size: int = 0):
    """Clear errors, before compilation, for shapes the mesh cannot divide."""
    t = mesh.shape["tensor"]
    for what, n in (("num_heads", model_cfg.num_heads), ("intermediate_size (GLU width)",
                                                        model_cfg.intermediate_size)):
        if n % t:
            raise ValueError(f"the tensor axis ({t}) does not divide {what} ({n}); use a tensor size that divides "
                             f"both num_heads ({model_cfg.num_heads}) and intermediate_size "
                             f"({model_cfg.intermediate_size})")
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    for what, b in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size)):
        if b and b % dp:
            raise ValueError(f"{what} {b} is not divisible by data x fsdp = {mesh.shape['data']} x "
                             f"{mesh.shape['fsdp']} = {dp}")
    s = mesh.shape.get("sequence", 1)
    if seq_len is not None and seq_len % s:
        raise ValueError(f"seq_len {seq_len} is not divisible by the sequence axis ({s})")


def rules(config=None):
    extra = tuple(tuple(r) for r in (getattr(config, "sharding_rules", None) or ()))
    return extra + DEFAULT_RULES


def param_shardings(logical_specs, mesh: Mesh, rule_table=DEFAULT_RULES):
    """Logical PartitionSpec tree -> NamedSharding tree (pass it through `fit_shardings` for the shapes)."""
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


def like_params(tree, params, mesh: Mesh):
    """Shardings for a tree that embeds copies of the parameter tree (an optimizer state: mu, nu, ...).

    A leaf whose path ends with a parameter's path and has its shape gets that parameter's sharding; every other
    leaf (step counts, per-parameter scalars, hyperparameters) is replicated. Sharding propagation cannot be relied
    on here: a moment created with `jnp.zeros(shape)` has no input to inherit a sharding from, and would otherwise
    be replicated on every device, which is exactly what FSDP must avoid.
    """
    by_path = {tuple(p): (x.shape, x.sharding) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def pick(path, x):
        for n in lengths:
            hit = by_path.get(tuple(path[-n:])) if len(path) >= n else None
            if hit is not None and tuple(hit[0]) == tuple(x.shape):
                return hit[1]
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, tree)


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: what Orbax restores onto and jit lowers with."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """This host's rows -> global jax.Arrays sharded over data x fsdp (works on one or many processes).

    Process i holds rows [i*b, (i+1)*b) of the global batch (the data pipeline's shard_index=process_index); the
    mesh's devices are ordered by process, so those rows are exactly the ones this process's devices own.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def process_sum(*values: float) -> tuple[float, ...]:
    """Sums host-side numbers over processes (identical on every process); a no-op on one process."""
    if jax.process_count() == 1:
        return tuple(float(v) for v in values)
    from jax.experimental import multihost_utils
    total = multihost_utils.process_allgather(np.asarray(values, np.float64)).sum(0)
    return tuple(float(v) for v in total)


# ------------------------------------------------------------------------------------------------ multi-host


def _env_int(name):
    v = os.environ.get(name)
    return None if v in (None, "") else int(v)


def _cluster_detected() -> bool:
    """A multi-process environment that jax.distributed.initialize() can configure by itself."""
    slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    return slurm or tpu_pod


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Starts jax.distributed when this is one process of several; returns whether it did.

    In order: the arguments (`ettin train --coordinator_address=host:port --num_processes=N --process_id=I`),
    the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), then JAX's own detection on TPU VM
    pod slices (every worker runs the same command; no arguments needed) and SLURM (srun, one task per host or
    GPU). A single process on one host starts nothing. Must run before anything touches a device.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if address or n is not None or pid is not None:
        if not address or n is None or pid is None:
            raise ValueError(f"multi-process training needs all of coordinator_address ({address!r}), "
                             f"num_processes ({n}) and process_id ({pid}), as flags or JAX_COORDINATOR_ADDRESS / "
                             "JAX_NUM_PROCESSES / JAX_PROCESS_ID")
        if not 0 <= pid < n:
            raise ValueError(f"process_id {pid} is not in [0, num_processes={n})")
        jax.distributed.initialize(address, num_processes=n, process_id=pid)
        return True
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False
