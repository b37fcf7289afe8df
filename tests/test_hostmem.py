"""ettin_jax.kernels.cpu.hostmem: glibc keeps freed memory, so a buffer freed and allocated again reuses resident pages."""
import json
import os
import subprocess
import sys

import pytest

from ettin_jax.kernels.cpu import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A thread (as XLA's are) allocates, writes and frees 64 MiB three times; prints the page faults of each round.
CHILD = r"""
import ctypes, json, resource, threading
from ettin_jax.kernels.cpu import hostmem
applied = hostmem.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def work():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(64 << 20)
        ctypes.memset(p, 1, 64 << 20)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps(dict(applied=applied, faults=faults)))
"""


def _child(keep: str) -> dict:
    env = dict(os.environ, ETTIN_JAX_KEEP_HEAP=keep)
    for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hostmem.glibc(), reason="glibc's malloc settings (Linux)")
def test_freed_memory_is_reused_without_page_faults():
    kept = _child("1")
    assert kept["applied"] is True
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    # the first round faults its pages in (fewer where the kernel gives huge pages); the next reuse them
    assert max(kept["faults"][1:]) < pages // 20, kept
    default = _child("0")
    assert default["applied"] is False
    # glibc's default: a block this large is mmap'd and unmapped at free, so every round faults all of it again
    assert min(default["faults"][1:]) > pages // 2, default


def test_off_switch_and_other_c_libraries(monkeypatch):
    monkeypatch.setattr(hostmem, "_applied", False)
    monkeypatch.setenv("ETTIN_JAX_KEEP_HEAP", "0")
    assert hostmem.keep_freed_memory() is False and hostmem.applied() is False
    monkeypatch.setenv("ETTIN_JAX_KEEP_HEAP", "1")
    monkeypatch.setattr(hostmem, "glibc", lambda: False)
    assert hostmem.keep_freed_memory() is False and hostmem.applied() is False


def test_cli_sets_it_only_as_the_process_entry_point(monkeypatch):
    from ettin_jax import cli
    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["ettin", "--help"]) == 0
    assert calls == []  # a call from Python (tests, notebooks) leaves the process's allocator alone
    monkeypatch.setattr(sys, "argv", ["ettin", "--help"])
    assert cli.main() == 0
    assert calls == [1]
