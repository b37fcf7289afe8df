"""Workdirs: where a run may write (ettin_jax.checkpoint), and a SIGKILL inside a checkpoint save."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from ettin_jax import checkpoint


def test_url_workdir_is_refused_with_the_mount_to_use():
    with pytest.raises(ValueError, match=re.escape("workdir 'gs://my-bucket/runs/1b' is a gs:// URL, but the workdir "
                                                   "is written with local file I/O: mount the bucket on every host "
                                                   "(`gcsfuse --implicit-dirs my-bucket /mnt/my-bucket`) and pass the "
                                                   "mount path, --workdir=/mnt/my-bucket/runs/1b")):
        checkpoint.check_workdir("gs://my-bucket/runs/1b")
    with pytest.raises(ValueError, match="is a s3:// URL"):
        checkpoint.check_workdir("s3://b/x")
    for ok in ("runs/p1", "/mnt/my-bucket/runs/1b", "C:/runs"):
        assert checkpoint.check_workdir(ok) == ok


# -------------------------------------------------------------------------------- SIGKILL in the middle of a save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["train", "--config=configs/demo.py", "--config.model.num_layers=2", "--config.model.hidden_size=64",
       "--config.model.intermediate_size=64", "--config.model.num_heads=1", "--config.global_batch_size=8",
       "--config.seq_len=64", "--config.total_steps=12", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=3", "--config.data.num_streams=8"]

# `ettin train` with Orbax's commit of a temporary folder (the rename that makes it final) wrapped: when the folder
# named by KILL_AT is about to be committed, the process SIGKILLs itself, inside the save, deterministically.
KILL_HOOK = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def commit_or_die(self, *args, **kwargs):
    if str(self._tmp_path).endswith(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return await commit(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = commit_or_die
from ettin_jax import cli
sys.exit(cli.main(["ettin", *sys.argv[1:]]))
"""


def _train(workdir, hook=None, kill_at=None):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", KILL_AT=kill_at or "")
    cmd = [sys.executable, *(["-c", hook] if hook else ["-m", "ettin_jax.cli"]), *RUN, f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(workdir):
    """[(step, loss)] in the order metrics.jsonl holds them (a resume rewrites the lines after its step)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(d["step"], d["loss"]) for d in map(json.loads, f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full") / "w"
    r = _train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, left", [
    # data_iter and meta committed, opt_state and params written but not: a checkpoint half made.
    ("6.orbax-checkpoint-tmp/opt_state.orbax-checkpoint-tmp", {"opt_state.orbax-checkpoint-tmp"}),
    # every item committed, the step's own folder not yet: the last moment before the checkpoint exists.
    ("6.orbax-checkpoint-tmp", {"params", "opt_state", "data_iter", "meta"}),
])
def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(kill_at, left, uninterrupted, tmp_path):
    workdir = tmp_path / "w"
    killed = _train(workdir, KILL_HOOK, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = workdir / "checkpoints"
    partial = ckpts / "6.orbax-checkpoint-tmp"
    assert partial.is_dir() and left <= set(os.listdir(partial))  # killed inside step 6's save
    assert not (partial / "commit_success.txt").exists()
    assert checkpoint.checkpoint_steps(str(workdir)) == [3]
    resumed = _train(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3 " in resumed.stdout + resumed.stderr
    assert [s for s, _ in uninterrupted] == list(range(1, 13))
    assert _losses(workdir) == uninterrupted  # bitwise, and each step once
    assert not partial.exists() and checkpoint.checkpoint_steps(str(workdir))[-1] == 12
