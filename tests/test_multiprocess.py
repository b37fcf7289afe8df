"""Two processes on one machine (jax.distributed, local coordinator, 4 CPU devices each) train like one process.

Both run `ettin train` with --coordinator_address/--num_processes/--process_id on one shared workdir and a mesh with
fsdp over all 8 devices, so every parameter is split across both processes (and Orbax writes each checkpoint from
both). Each process's data pipeline reads only its own rows (shard_index = process index); only process 0 writes
metrics.jsonl, whose losses must match a single 8-device process's.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from ettin_jax import flops, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import losses, small  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
MODEL = dict(num_layers=2, hidden_size=128, intermediate_size=128, num_heads=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_command(workdir, port, process_id):
    return [sys.executable, "-m", "ettin_jax.cli", "train", "--config=configs/demo.py", f"--workdir={workdir}",
            *[f"--config.model.{k}={v}" for k, v in MODEL.items()],
            "--config.global_batch_size=8", "--config.seq_len=64", f"--config.total_steps={STEPS}",
            "--config.total_tokens=0",  # total_steps is the budget (the schedule's horizon), as in test_train.small
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=2", "--config.data.num_streams=8",
            "--config.mesh.data=1", "--config.mesh.fsdp=-1",
            f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={process_id}"]


def _run_together(commands, timeout):
    """Starts one process per command at once (4 CPU devices each, no inherited coordinator settings) and returns
    their outputs after checking that every one exited 0; a process still running on failure is killed."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS",
                                                            "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env.update(PYTHONPATH=REPO, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for c in commands]
    try:
        outs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _provenance(workdir, host):
    path = os.path.join(workdir, "provenance", f"host_{host:05d}", "steps_000000.jsonl")
    with open(path) as f:
        return [json.loads(l) for l in f]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_like_one(tmp_path, monkeypatch):
    multi = str(tmp_path / "two")
    port = _free_port()
    outs = _run_together([_train_command(multi, port, i) for i in (0, 1)], timeout=540)
    assert "'fsdp': 8" in outs[0]  # one mesh over both processes' devices

    # The reference: one process with all 8 devices, same config and mesh.
    c = small("paired", steps=STEPS)
    c.model.update(**MODEL)
    c.mesh.data, c.mesh.fsdp = 1, -1
    monkeypatch.setattr(flops, "peak_flops_per_device", lambda dtype="float32": (1e12, "test"))
    single = str(tmp_path / "one")
    train.train(c, single, log=lambda *_: None)

    for arch in ("encoder", "decoder"):
        a, b = losses(multi, f"{arch}/loss"), losses(single, f"{arch}/loss")
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
        d = max(abs(a[s] - b[s]) / abs(b[s]) for s in a)
        print(f"{arch}: two processes vs one, max relative loss difference over {STEPS} steps {d:.2e}")
        assert d <= 1e-5, (arch, a, b)
    assert losses(multi, "tokens_seen") == losses(single, "tokens_seen")  # global token counts, not per process

    # Each process read only its own rows, and together they read exactly the single process's batch.
    one = _provenance(single, 0)
    for host in (0, 1):
        recs = _provenance(multi, host)
        assert [r["step"] for r in recs] == list(range(STEPS))
        for r, ref in zip(recs, one):
            assert (r["shard_index"], r["shard_count"]) == (host, 2)
            assert [row["row"] for row in r["rows"]] == list(range(4 * host, 4 * host + 4))
            assert r["rows"] == ref["rows"][4 * host:4 * host + 4]

    # Orbax wrote the checkpoints from both processes (each with its own data-iterator state).
    for step in (2, STEPS):
        names = sorted(os.listdir(os.path.join(multi, "checkpoints", str(step), "data_iter")))
        assert [n for n in names if n.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]


_HYBRID = """
import json, sys
from ettin_jax import sharding
sharding.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_data=2))
print(json.dumps(dict(shape=dict(mesh.shape), processes=[sorted({d.process_index for d in row.flat})
                                                          for row in mesh.devices])))
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_hybrid_mesh_puts_the_dcn_axis_across_processes():
    """config.mesh.dcn_data=2 over two processes of 4 CPU devices (processes stand in for slices: CPU devices have
    no slice_index): the within-slice sizes resolve against 4 devices (fsdp=-1 -> 4), data spans the 2 slices, and
    each data row holds exactly one slice's devices, so only `data` crosses the slower network."""
    port = _free_port()
    outs = _run_together([[sys.executable, "-c", _HYBRID, f"localhost:{port}", str(i)] for i in (0, 1)], timeout=240)
    for out in outs:
        got = json.loads(out.strip().splitlines()[-1])
        assert got == dict(shape=dict(data=2, fsdp=4, sequence=1, tensor=1), processes=[[0], [1]]), got
