"""The trainer: determinism, resume after SIGKILL, phases, cross-objective, NaN guard, bad configs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ettin_jax import checkpoint, recipe, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))


def small(objective="paired", phase="pretrain", steps=4, **kw):
    """The demo config shrunk to seconds: 2 layers x 64 wide, 8 x 64 tokens."""
    import demo
    c = demo.get_config()
    c.objective = objective
    c.phase = phase
    if phase != "pretrain":
        recipe.apply_phase(c, phase)
    c.model.update(num_layers=2, hidden_size=64, intermediate_size=64, num_heads=1)
    c.global_batch_size, c.seq_len, c.total_steps = 8, 64, steps
    c.log_every_steps, c.checkpoint_every_steps, c.checkpoint_every_tokens = 1, 2, 0.0
    c.data.num_streams = 8
    for k, v in kw.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def losses(workdir, key="loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {d["step"]: d[key] for d in map(json.loads, f)}


@pytest.mark.slow
def test_same_command_twice_gives_identical_losses(tmp_path):
    train.train(small(), str(tmp_path / "a"), log=lambda *_: None)
    train.train(small(), str(tmp_path / "b"), log=lambda *_: None)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 4 and a == b  # bitwise
    assert set(checkpoint.load_models(str(tmp_path / "a"))) == {"encoder", "decoder"}


@pytest.mark.slow
def test_paired_run_trains_both_on_the_same_batches(tmp_path):
    logs = []
    out = train.train(small(steps=2), str(tmp_path), log=logs.append)
    assert "encoder/loss" in out and "decoder/loss" in out and out["tokens_per_sec"] > 0
    rec = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rec] == [1, 2]
    for r in rec:
        assert r["encoder/tokens"] == r["decoder/tokens"]  # one batch, two models
        assert r["loss"] == pytest.approx(r["encoder/loss"] + r["decoder/loss"])
    # Resuming a finished run does nothing and keeps the record.
    train.train(small(steps=2), str(tmp_path), log=logs.append)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2]


def _run_cli(workdir, extra=(), **popen):
    cmd = [sys.executable, "-m", "ettin_jax.cli", "train", "--config=configs/demo.py", f"--workdir={workdir}",
           "--config.model.num_layers=2", "--config.model.hidden_size=64", "--config.model.intermediate_size=64",
           "--config.model.num_heads=1", "--config.global_batch_size=8", "--config.seq_len=64",
           "--config.total_steps=12", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
           "--config.data.num_streams=8", *extra]
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


@pytest.mark.slow
def test_resume_after_sigkill_logs_the_same_losses(tmp_path):
    full = _run_cli(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stdout.read().decode()[-3000:]
    killed = _run_cli(tmp_path / "killed")
    kill_after = np.random.default_rng(int(time.time())).integers(4, 10)
    path = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= kill_after:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    killed.wait(timeout=60)
    resumed = _run_cli(tmp_path / "killed")
    out = resumed.stdout.read().decode()
    assert resumed.wait(timeout=600) == 0, out[-3000:]
    assert "resumed from step" in out
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 13))
    assert a == b  # the steps after the resume point log exactly the uninterrupted losses


@pytest.mark.slow
def test_phases_and_both_cross_objective_directions(tmp_path):
    log = lambda *_: None
    p1 = str(tmp_path / "p1")
    train.train(small("paired", "pretrain", steps=2), p1, log=log)
    p2 = str(tmp_path / "p2")
    c2 = small("paired", "extension", steps=2, init_from=p1)
    assert c2.init_mode == "full" and c2.mlm_rate == 0.3 and c2.model.global_rope_theta == 160_000.0
    c2.seq_len = 128
    train.train(c2, p2, log=log)
    # The optimizer state continued: its step count is the sum of both phases.
    params, opt = checkpoint.Checkpoints(p2, async_save=False).restore(2, opt_state=None).get("params"), None
    assert set(params) == {"encoder", "decoder"}
    c3 = small("paired", "decay", steps=2, init_from=p2)
    assert c3.mlm_rate == 0.15 and c3.init_mode == "full"
    c3.seq_len = 128
    train.train(c3, str(tmp_path / "p3"), log=log)
    msgs = []
    enc = small("mlm", "cross", steps=2, init_from=str(tmp_path / "p3"))
    assert enc.init_mode == "weights"
    train.train(enc, str(tmp_path / "enc_from_dec"), log=msgs.append)
    assert any("the encoder starts from the decoder's weights" in m for m in msgs)
    dec = small("clm", "cross", steps=2, init_from=str(tmp_path / "p3"))
    train.train(dec, str(tmp_path / "dec_from_enc"), log=msgs.append)
    assert any("the decoder starts from the encoder's weights" in m for m in msgs)
    mntp = small("mntp", "cross", steps=2, init_from=str(tmp_path / "p3"))
    out = train.train(mntp, str(tmp_path / "mntp"), log=log)
    assert np.isfinite(out["encoder/loss"])
    # The cross-objective encoder's first loss is far below a fresh model's (it starts from trained weights).
    p3_dec = checkpoint.load_model_from_workdir(str(tmp_path / "p3"), "decoder")[0]
    e0 = checkpoint.load_model_from_workdir(str(tmp_path / "enc_from_dec"), "encoder", step=2)[0]
    assert jax.tree_util.tree_structure(p3_dec) == jax.tree_util.tree_structure(e0)


@pytest.mark.slow
def test_nan_stops_with_last_good_checkpoint_intact(tmp_path):
    c = small("mlm", steps=6, **{"optimizer.peak_lr": 1e30, "checkpoint_every_steps": 1})
    c.schedule.warmup_tokens = 1.0
    with pytest.raises(RuntimeError, match=r"non-finite loss or gradient at step (\d+).*last good checkpoint is step"):
        train.train(c, str(tmp_path), log=lambda *_: None)
    steps = checkpoint.Checkpoints(str(tmp_path), async_save=False).steps()
    assert steps and max(steps) < 6
    params = checkpoint.load_model_from_workdir(str(tmp_path), "encoder")[0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_nan_skip_policy_keeps_going(tmp_path):
    c = small("clm", steps=3, nonfinite="skip", **{"optimizer.peak_lr": 1e30})
    c.schedule.warmup_tokens = 1.0
    msgs = []
    train.train(c, str(tmp_path), log=msgs.append)
    assert any("step skipped" in m for m in msgs)
    params = checkpoint.load_model_from_workdir(str(tmp_path), "decoder")[0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
    train.train(small("clm", steps=1), str(tmp_path), log=lambda *_: None)
    other = small("clm", steps=2, **{"optimizer.peak_lr": 1e-4})
    with pytest.raises(train.ConfigError, match=r"different config \(optimizer.peak_lr: 0.003 -> 0.0001"):
        train.train(other, str(tmp_path), log=lambda *_: None)
    train.train(other, str(tmp_path), allow_config_change=True, log=lambda *_: None)
    assert sorted(losses(tmp_path)) == [1, 2]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    train.train(small("clm", steps=4), str(tmp_path), log=lambda *_: None)
    ckdir = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [2, 4]
    for root, _, files in os.walk(ckdir / "4" / "params"):
        for f in files:
            open(os.path.join(root, f), "wb").close()  # truncate every file: unreadable
    msgs = []
    train.train(small("clm", steps=6), str(tmp_path), log=msgs.append)
    assert any("checkpoint 4" in m and "could not be read" in m for m in msgs)
    assert any("resumed from step 2" in m for m in msgs)
    assert max(losses(tmp_path)) == 6


@pytest.mark.parametrize("override, message", [
    (dict(size="2b"), "unknown size '2b'"),
    (dict(objective="seq2seq"), "unknown objective 'seq2seq'"),
    (dict(phase="warmup"), "unknown phase 'warmup'"),
    ({"model.num_heads": 3}, "hidden_size 64 is not divisible by num_heads 3"),
    (dict(seq_len=10000), "seq_len 10000 is above max_position_embeddings 8192"),
    (dict(global_batch_size=6), "global_batch_size 6 is not divisible by data x fsdp = 8 x 1 = 8"),
    ({"mesh.data": 3}, "mesh .* has 3 devices, but 8 are available"),
])
def test_bad_configs_fail_before_compiling(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train.train(small(**override), str(tmp_path), log=lambda *_: None)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_gradient_accumulation_and_remat_give_the_same_losses(tmp_path):
    """Micro-batches (strided, normalised by the whole batch's count) and rematerialisation change nothing."""
    two = {"mesh.num_devices": 2}  # micro-batches of 2 rows split over 2 data shards
    train.train(small("paired", steps=3, **two), str(tmp_path / "base"), log=lambda *_: None)
    train.train(small("paired", steps=3, micro_batch_size=2, **two), str(tmp_path / "accum"), log=lambda *_: None)
    train.train(small("paired", steps=3, **{"model.remat": "full"}, **two), str(tmp_path / "remat"),
                log=lambda *_: None)
    ref = losses(tmp_path / "base")
    for run in ("accum", "remat"):
        for key in ("encoder/loss", "decoder/loss"):
            got, want = losses(tmp_path / run, key), losses(tmp_path / "base", key)
            for step in want:
                assert got[step] == pytest.approx(want[step], rel=1e-5), (run, key, step)
    assert ref  # three logged steps
