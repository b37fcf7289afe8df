"""Keep freed host memory in the process, so that XLA:CPU's per-step buffers do not fault in fresh pages each step.

XLA:CPU allocates a jitted step's temporaries (the activations kept for the backward pass: about 1 GB for the 17m
at 8 x 1024) with malloc at every call and frees them at its end. glibc serves blocks that large from mmap, from
the thread arena of whichever XLA thread runs the step, and returns them to the kernel on free, so every step
touches ~280,000 fresh 4 KiB pages: the kernel zeroes each on first touch (0.6 s of system time per 3.4 s step on
the project's 2-core host), inside whichever op writes it first. `keep_freed_memory()` makes glibc serve every
thread from the main heap (one arena), never from mmap, and never hand freed memory back: after the first step
each step's buffers reuse the pages of the one before. The 17m MLM train step 3.39 s -> 3.15-3.21 s, no page
faults left (docs/perf.md item 18).

The price: the process keeps its peak heap until it exits, one arena fragments more (the 17m MLM step's
fresh-process peak RSS 1.77 -> 2.4-2.6 GB), and all threads share one allocator lock (no measurable cost with
XLA's few large allocations). The `ettin` command calls it first thing (the benchmark script with --heap=keep);
in a notebook or your own script call it before the first jax computation (threads that allocated before keep
their own arenas). ETTIN_JAX_KEEP_HEAP=0 turns it off. glibc (Linux) only;
elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_applied = False


def glibc() -> bool:
    """Whether this process's C library is glibc (Linux)."""
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def applied() -> bool:
    """Whether `keep_freed_memory` has applied in this process."""
    return _applied


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one arena, no mmap'd blocks and no trimming; True where it applied (now or before).

    Off (False) with ETTIN_JAX_KEEP_HEAP=0 or a C library other than glibc. Safe to call more than once.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("ETTIN_JAX_KEEP_HEAP", "1") == "0" or not glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The arena limit first: threads that have not allocated yet then share the main heap, which (unlike a thread
    # arena, at most 64 MB) grows to any size, so the next two settings hold for their blocks too.
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    _applied = ok
    return ok
