"""Which platform a computation is traced for.

The answer comes from the devices the step is compiled for: the mesh set by `jax.set_mesh` (its abstract device), or,
with no mesh, the default devices. Never from `jax.default_backend()`: a step traced on a CPU host for a TPU topology
(`ettin compile`) runs on TPU devices, and must lower the TPU paths. The mesh is part of jit's trace-cache key, so a
function traced for one platform is never reused for another.
"""
from __future__ import annotations

import jax

_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the devices the current trace compiles for."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        if device is not None and device.platform:
            return _ALIASES.get(device.platform, device.platform)
    p = jax.devices()[0].platform
    return _ALIASES.get(p, p)


def mesh_size() -> int:
    """Devices the current trace spans: the mesh's, or this process's when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.device_count() if mesh.empty else mesh.size
