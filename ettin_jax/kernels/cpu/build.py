"""Builds and registers the native XLA FFI handlers in `ettin_jax/native/` (CPU only).

Each handler (`native/<name>.cc`, with the shared headers beside it) is compiled on first use with the system's
C++ compiler (`g++`, or $CXX) against jaxlib's FFI headers into ~/.cache/ettin_jax (or $ETTIN_JAX_CACHE), keyed
by the sources, jaxlib's version and the CPU, and registered for the CPU backend once per process. Where that
fails (no compiler, another platform, a damaged cached library), `register` returns False with the reason logged
and the caller uses its plain XLA path; ETTIN_JAX_NATIVE=0 turns every handler off.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from typing import Optional

import jax

from ettin_jax.kernels.cpu import dots
from ettin_jax.kernels.platform import mesh_size, platform as target_platform

FOLDER = os.path.join(os.path.dirname(__file__), "native")


def enabled() -> bool:
    """Native handlers may be used: the step is traced for CPU devices (`kernels.platform`) and ETTIN_JAX_NATIVE is not 0."""
    return os.environ.get("ETTIN_JAX_NATIVE", "1") != "0" and target_platform() == "cpu"


def one_device() -> bool:
    """One device here: the mesh set by `jax.set_mesh` has one, or there is no mesh and the process has one. (A
    custom call is not partitioned: under a mesh of several devices each would compute the whole problem.)"""
    return mesh_size() == 1


def _cpu_key() -> str:
    return platform.machine() + " ".join(sorted(dots.cpu_flags()))


def build(name: str) -> Optional[str]:
    """Compiles native/<name>.cc (once per source, headers, jaxlib and CPU); returns the library's path or None,
    with the reason logged."""
    source = os.path.join(FOLDER, f"{name}.cc")
    digest = hashlib.sha256()
    for path in [source] + sorted(glob.glob(os.path.join(FOLDER, "*.h"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(jax.lib.__version__.encode() + _cpu_key().encode())
    folder = os.environ.get("ETTIN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ettin_jax")
    path = os.path.join(folder, f"{name}_{digest.hexdigest()[:16]}.so")
    if os.path.isfile(path):
        return path
    compiler, tmp = os.environ.get("CXX", "g++"), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17",
                        f"-I{jax.ffi.include_dir()}", source, "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
        return path
    except (OSError, subprocess.SubprocessError) as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        detail = getattr(e, "stderr", "") or str(e)
        logging.warning("ettin_jax: the native %s could not be built (%s: %s); the plain XLA path is used instead",
                        name, compiler, detail.strip()[-500:])
        return None


@functools.cache
def register(name: str, targets: tuple[tuple[str, str], ...], cpu_flag: Optional[str] = None) -> bool:
    """Builds native/<name>.cc and registers its handlers, (FFI target, exported symbol) pairs, for the CPU backend;
    False (decided once per process) where native handlers are off, the CPU lacks `cpu_flag` (as /proc/cpuinfo
    names it; nothing is built then), or the build or load failed."""
    if not enabled() or (cpu_flag is not None and cpu_flag not in dots.cpu_flags()):
        return False
    path = build(name)
    if path is None:
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(path)
    except OSError as e:  # a damaged cached library: say where it is, run without it
        logging.warning("ettin_jax: could not load %s (%s); delete it to rebuild", path, e)
        return False
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True
