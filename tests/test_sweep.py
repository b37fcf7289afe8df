"""Sweeps: the product/zip_ helpers, planning and its errors (nothing runs), the shipped sweeps, TPU dry runs, and
one end-to-end sweep of two tiny points (killed mid-point, resumed, skipped when complete) and its report."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ettin_jax import checkpoint, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo pair shrunk to seconds per run; its sweeps are what the tests need.
TEST_CONFIG = textwrap.dedent('''
    import importlib.util
    from ettin_jax.sweep import product, zip_

    _spec = importlib.util.spec_from_file_location("_demo", {demo!r})
    _demo = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_demo)


    def get_config(arg=None):
        c = _demo.get_config()
        c.model.update(num_layers=2, hidden_size=32, intermediate_size=64)
        c.global_batch_size, c.seq_len, c.total_steps = 2, 64, 60
        c.log_every_steps, c.checkpoint_every_steps = 5, 5
        return c


    SWEEPS = {{
        "two": lambda: product(("config.objective", ["mlm", "clm"])),
        "typo": lambda: product(("config.optimizer.peak_lrr", [1e-3, 3e-3])),
        "typo_nested": lambda: product(("config.nope.x", [1, 2])),
        "same": lambda: [{{"config.seed": 1}}, {{"config.seed": 1}}],
        "bad_value": lambda: product(("config.objective", ["mlm", "mlx"])),
    }}


    def get_sweep(name):
        if name not in SWEEPS:
            raise ValueError(f"unknown sweep {{name!r}}")
        return SWEEPS[name]()
''')


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny_sweeps.py"
    path.write_text(TEST_CONFIG.format(demo=os.path.join(REPO, "configs", "demo.py")))
    return str(path)


def _env():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _ettin(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ettin_jax.cli", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, **kw)


# ------------------------------------------------------------------------------------------------ helpers


def test_product_and_zip():
    pts = sweep.product({"config.seed": 0}, ("config.size", ["tiny", "17m"]), ("config.objective", ["mlm", "clm"]))
    assert pts == [{"config.seed": 0, "config.size": s, "config.objective": o}
                   for s in ("tiny", "17m") for o in ("mlm", "clm")]
    z = sweep.zip_(("config.size", ["tiny", "17m"]), ("config.optimizer.peak_lr", [3e-3, 1e-3]))
    assert z == [{"config.size": "tiny", "config.optimizer.peak_lr": 3e-3},
                 {"config.size": "17m", "config.optimizer.peak_lr": 1e-3}]
    assert len(sweep.product(z, ("config.seed", [1, 2]))) == 4
    with pytest.raises(sweep.SweepError, match="different lengths"):
        sweep.zip_(("config.a", [1, 2]), ("config.b", [1]))
    with pytest.raises(sweep.SweepError, match="config.a"):
        sweep.product(("config.a", [1]), {"config.a": 2})


def test_point_names():
    pts = sweep.product({"config.objective": "mlm"}, ("config.optimizer.peak_lr", [1e-3, 3e-3]))
    assert sweep.point_names(pts) == ["peak_lr=0.001", "peak_lr=0.003"]  # fixed keys are not in the name
    pts = [{"config.model.dtype": "a/b"}, {"config.model.dtype": "c"}]
    assert sweep.point_names(pts) == ["dtype=a_b", "dtype=c"]
    pts = [{"config.a.x": 1, "config.b.x": 2}, {"config.a.x": 3, "config.b.x": 4}]
    assert sweep.point_names(pts) == ["a.x=1,b.x=2", "a.x=3,b.x=4"]  # a shared last part: the full path
    assert sweep.point_names([{"config.seed": 1}]) == ["default"]


# -------------------------------------------------------------------------------------- planning and errors


def test_plan_resolves_points(config_file, tmp_path):
    points = sweep.plan(config_file, "two", str(tmp_path / "root"), ["--config.total_steps=7"])
    assert [p.name for p in points] == ["objective=mlm", "objective=clm"]
    assert [p.config.objective for p in points] == ["mlm", "clm"]
    assert all(p.total_steps == 7 and p.status() == "new" for p in points)
    assert points[0].command[4:] == [f"--config={config_file}", f"--workdir={tmp_path / 'root' / 'objective=mlm'}",
                                     "--config.total_steps=7", "--config.objective=mlm"]
    assert not (tmp_path / "root").exists()  # planning writes nothing


@pytest.mark.parametrize("name,match", [
    ("nope", "unknown sweep 'nope'"),
    ("typo", r"point 'peak_lrr=0\.001'.*unknown config field 'config\.optimizer\.peak_lrr'; did you mean"),
    ("typo_nested", r"config\.nope\.x.*unknown config field 'config\.nope'"),
    ("same", r"would share the workdir .*default"),
    ("bad_value", r"point 'objective=mlx'.*unknown objective 'mlx'"),
])
def test_bad_sweeps_fail_before_running(config_file, tmp_path, name, match):
    with pytest.raises(sweep.SweepError, match=match):
        sweep.plan(config_file, name, str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()


def test_bad_common_override(config_file, tmp_path):
    with pytest.raises(sweep.SweepError, match="total_stepz"):
        sweep.plan(config_file, "two", str(tmp_path / "root"), ["--config.total_stepz=3"])


@pytest.mark.slow
def test_cli_errors_are_clear(config_file, tmp_path):
    r = _ettin("sweep", f"--config={config_file}", "--sweep=typo", f"--workdir_root={tmp_path / 'r'}")
    assert r.returncode == 2 and "unknown config field 'config.optimizer.peak_lrr'" in r.stderr, r.stderr
    r = _ettin("sweep", f"--config={config_file}", "--sweep=two", f"--workdir_root={tmp_path / 'r'}", "--tpu=v")
    assert r.returncode == 2 and "--dry_run" in r.stderr
    r = _ettin("sweep-report", f"--workdir_root={tmp_path / 'empty'}")
    assert r.returncode == 2 and "no sweep points" in r.stderr
    assert not (tmp_path / "r").exists()


def test_tpu_command_uses_the_checkout_path():
    pt = sweep.plan(os.path.join(REPO, "configs", "demo.py"), "lr", "/mnt/b/lr")[0]
    assert sweep.tpu_command(pt, "vm", None, "ettin-jax") == (
        "gcloud compute tpus tpu-vm ssh vm --worker=all '--command=cd ettin-jax && ettin train "
        "--config=configs/demo.py --workdir=/mnt/b/lr/peak_lr=0.001 --config.optimizer.peak_lr=0.001'")


def test_shipped_sweeps_dry_run():
    """Every shipped sweep validates against its config; the dry run prints one train command per point."""
    expected = {("configs/demo.py", "lr"): ["peak_lr=0.001", "peak_lr=0.003", "peak_lr=0.01"],
                ("configs/demo.py", "mask_rate"): ["mlm_rate=0.15", "mlm_rate=0.3", "mlm_rate=0.4"],
                ("configs/ettin.py", "size_objective"): [f"size={s},objective={o}" for s in ("tiny", "17m")
                                                         for o in ("mlm", "clm")]}
    for (config, name), names in expected.items():
        points = sweep.plan(os.path.join(REPO, config), name, "/nonexistent/root")
        assert [p.name for p in points] == names
        if name == "mask_rate":
            assert {p.config.objective for p in points} == {"mlm"}
            assert [p.config.mlm_rate for p in points] == [0.15, 0.3, 0.4]
        if name == "size_objective":
            assert {p.total_steps for p in points} == {30}


@pytest.mark.slow
def test_tpu_dry_run(config_file):
    r = _ettin("sweep", f"--config={config_file}", "--sweep=two", "--workdir_root=/mnt/bucket/two", "--dry_run",
               "--tpu=my-vm", "--zone=us-central2-b", "--config.total_steps=9")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("gcloud")]
    assert len(lines) == 2
    assert lines[0].startswith("gcloud compute tpus tpu-vm ssh my-vm --zone=us-central2-b --worker=all "
                               "'--command=cd ettin-jax && ettin train --config=")
    assert "--workdir=/mnt/bucket/two/objective=mlm --config.total_steps=9 --config.objective=mlm" in lines[0]
    # A bucket URL would become a local folder named "gs:" on the VM: refused, pointing at a gcsfuse mount.
    r = _ettin("sweep", f"--config={config_file}", "--sweep=two", "--workdir_root=gs://bucket/two", "--dry_run",
               "--tpu=my-vm")
    assert r.returncode == 2 and "gcsfuse --implicit-dirs bucket /mnt/bucket" in r.stderr
    assert "gcloud" not in r.stdout


# ---------------------------------------------------------------------------------------------- end to end


def _wait_for(cond, proc, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sweep_kill_resume_skip_report(config_file, tmp_path):
    root = tmp_path / "root"
    args = ["sweep", f"--config={config_file}", "--sweep=two", f"--workdir_root={root}"]
    mlm, clm = root / "objective=mlm", root / "objective=clm"

    # 1. Kill the sweep (SIGKILL) once the first point has a checkpoint but is not complete.
    log = tmp_path / "killed_sweep.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ettin_jax.cli", *args], cwd=REPO, env=_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        caught = _wait_for(lambda: [s for s in checkpoint.checkpoint_steps(str(mlm)) if s < 60], proc, 240)
        assert caught, f"no partial checkpoint seen; sweep output:\n{log.read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 60 not in checkpoint.checkpoint_steps(str(mlm)) and not checkpoint.checkpoint_steps(str(clm))

    # 2. Started again (two points at a time): the killed point resumes, after its orphaned trainer (told by
    # SIGTERM when the sweep died) has saved and left; the other starts.
    r = _ettin(*args, "--parallel=2", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "objective=mlm: resuming, partial" in r.stdout
    assert "resumed from step" in r.stdout
    assert "objective=clm: starting, new" in r.stdout
    assert checkpoint.checkpoint_steps(str(mlm))[-1] == 60 and checkpoint.checkpoint_steps(str(clm))[-1] == 60
    steps = [json.loads(l)["step"] for l in (mlm / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60

    # 3. Again: both complete, nothing runs or writes.
    mtimes = {p: os.stat(p / "metrics.jsonl").st_mtime_ns for p in (mlm, clm)}
    r = _ettin(*args, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("complete (checkpoint at step 60), skipped") == 2 and "starting" not in r.stdout
    assert mtimes == {p: os.stat(p / "metrics.jsonl").st_mtime_ns for p in (mlm, clm)}

    # 4. The report: one row per point, the final metrics, a plot of the swept value.
    r = _ettin("sweep-report", f"--workdir_root={root}", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    md = (root / "report.md").read_text()
    assert "| point | objective | status | step |" in md and "objective=mlm" in md and "objective=clm" in md
    rows = {row["point"]: row for row in csv.DictReader(open(root / "report.csv"))}
    assert set(rows) == {"objective=mlm", "objective=clm"}
    last = json.loads((mlm / "metrics.jsonl").read_text().splitlines()[-1])
    assert float(rows["objective=mlm"]["encoder/loss"]) == pytest.approx(last["encoder/loss"])
    assert rows["objective=clm"]["decoder/loss"] and not rows["objective=clm"]["encoder/loss"]
    assert all(r["status"] == "complete" and r["step"] == "60" for r in rows.values())
    png = root / "report_objective.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_status_follows_the_trainers_end_of_run_rule(tmp_path):
    """A run ends at its token budget before its total_steps cap: such a point is complete, not partial."""
    def checkpoint_at(step, tokens):
        meta = tmp_path / "checkpoints" / str(step) / "meta"
        meta.mkdir(parents=True)
        (meta / "metadata").write_text(json.dumps(dict(step=step, tokens=tokens, phase="pretrain")))

    assert sweep.run_status(str(tmp_path), 100, 1000) == "new"
    checkpoint_at(3, 600)
    assert sweep.run_status(str(tmp_path), 100, 1000) == "partial (step 3, 600 of 1,000 tokens)"
    checkpoint_at(5, 1000)  # the budget reached at step 5, far below the cap
    assert sweep.run_status(str(tmp_path), 100, 1000) == "complete"
    assert sweep.run_status(str(tmp_path), 5, 0) == "complete"  # no token budget: total_steps ends the run
    assert sweep.run_status(str(tmp_path), 6, 0) == "partial (step 5 of 6)"
