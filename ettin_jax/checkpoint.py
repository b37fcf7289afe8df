"""Workdirs and Orbax checkpoints.

A workdir holds everything a run needs to resume and everything a paper needs afterwards:

    config.json          the run's full config (resume refuses a different one, naming the fields)
    models.json          {architecture: ModelConfig fields} of each model the run trains
    commands.jsonl       the `ettin train` command of each start or resume (quoted in an export's model card)
    tokenizer/           the tokenizer files (exports copy them)
    checkpoints/N/       Orbax items: params, opt_state (absent for imports), data_iter (Grain state), meta (JSON)
    metrics.jsonl        one JSON object per logged step; tensorboard/ the same as event files
    provenance/          which documents formed each step's batch (`ettin batches`)

Saves are asynchronous; Orbax writes each step to a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the latest (tests/test_checkpoint.py SIGKILLs the trainer inside a save
and resumes). A checkpoint that still fails to read (a corrupt file) is skipped on resume, with a message, in favour
of the newest one that reads.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional

import jax
import orbax.checkpoint as ocp

from ettin_jax.model import ModelConfig

ITEMS = ("params", "opt_state", "data_iter", "meta")


def _json_path(workdir, name):
    return os.path.join(workdir, name)


def write_json(workdir: str, name: str, obj):
    """Atomic JSON write (temporary file + rename)."""
    os.makedirs(workdir, exist_ok=True)
    path = _json_path(workdir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def append_jsonl(workdir: str, name: str, obj):
    """Appends one JSON line (a log such as commands.jsonl)."""
    os.makedirs(workdir, exist_ok=True)
    with open(_json_path(workdir, name), "a") as f:
        f.write(json.dumps(obj, sort_keys=True, default=str) + "\n")


def read_jsonl(workdir: str, name: str) -> list:
    """The objects of a JSON-lines file of the workdir ([] if absent); unreadable lines are skipped."""
    out = []
    try:
        with open(_json_path(workdir, name)) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        return []
    return out


def read_json(workdir: str, name: str):
    path = _json_path(workdir, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file was cut short or edited") from None


def save_models(workdir: str, models: dict[str, ModelConfig]):
    write_json(workdir, "models.json", {arch: cfg.to_dict() for arch, cfg in models.items()})


def load_models(workdir: str) -> dict[str, ModelConfig]:
    d = read_json(workdir, "models.json")
    if d is None:
        raise FileNotFoundError(f"{workdir} has no models.json: not an ettin workdir")
    return {arch: ModelConfig.from_dict(fields) for arch, fields in d.items()}


def copy_tokenizer(src_dir: str, workdir: str):
    dst = os.path.join(workdir, "tokenizer")
    if os.path.abspath(src_dir) == os.path.abspath(dst):
        return dst
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src_dir):
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), dst)
    return dst


def check_workdir(path: str) -> str:
    """Refuses a workdir that is a URL (gs://, s3://, ...); returns the path unchanged otherwise.

    The trainer writes its workdir with local file I/O (config.json, metrics.jsonl, provenance/, tensorboard/,
    the tokenizer), which would turn gs://B/x into a local folder named "gs:". A bucket is used through a mount
    (gcsfuse), which every host of a pod slice sees as the same directory.
    """
    scheme, sep, rest = str(path).partition("://")
    if sep and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        bucket, _, sub = rest.partition("/")
        mount = f"/mnt/{bucket or 'BUCKET'}"
        how = f"`gcsfuse --implicit-dirs {bucket} {mount}`" if scheme == "gs" else "a FUSE mount"
        raise ValueError(f"workdir {path!r} is a {scheme}:// URL, but the workdir is written with local file I/O: "
                         f"mount the bucket on every host ({how}) and pass the mount path, "
                         f"--workdir={mount}/{sub} (docs/scaling.md)")
    return path


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints in a workdir (Orbax renames a step's folder to its number, and writes
    commit_success.txt, only once the save is complete)."""
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def read_meta(workdir: str, step: int) -> Optional[dict]:
    """The `meta` item (step, non-pad tokens, phase) of a finished checkpoint, or None: Orbax's JsonSave writes it
    as a small JSON file, read here without starting a CheckpointManager (sweeps poll many workdirs)."""
    try:
        with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Checkpoints:
    """Orbax CheckpointManager over a workdir: keep the last `keep_last` plus every `keep_period`-th step."""

    def __init__(self, workdir: str, *, keep_last: int = 3, keep_period: Optional[int] = None,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_period or None, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, *, params, opt_state=None, data_iter=None, meta: dict):
        import grain
        args = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, *, params=None, opt_state=None, data_iter=None):
        """Restores the items asked for (abstract trees with shardings, or None for raw arrays); returns a dict."""
        import grain
        args = dict(meta=ocp.args.JsonRestore(), params=ocp.args.StandardRestore(params))
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardRestore(opt_state)
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {k: out[k] for k in args}

    def restore_latest(self, log=print, **items):
        """(step, restored items) of the newest checkpoint that reads, or (None, None) when there is none."""
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, **items)
            except Exception as e:  # a corrupt or partial checkpoint: fall back to the previous one
                log(f"checkpoint {step} in {self.directory} could not be read ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); trying an older one")
        return None, None

    def quarantine_after(self, step: int, log=print):
        """Moves checkpoints newer than `step` (unreadable ones we fell back from) to checkpoints.corrupt/, so the
        resumed run can save those steps again and the evidence is kept."""
        moved = [s for s in self.steps() if s > step]
        if not moved:
            return
        dest = self.directory + ".corrupt"
        os.makedirs(dest, exist_ok=True)
        for s in moved:
            target = os.path.join(dest, f"{s}.{int(__import__('time').time())}")
            shutil.move(os.path.join(self.directory, str(s)), target)
            log(f"moved unreadable checkpoint {s} to {target}")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def load_model_from_workdir(workdir: str, which: Optional[str] = None, step: Optional[int] = None):
    """(params, ModelConfig, arch, tokenizer_dir) of one model of a workdir (the only one, or `which`)."""
    models = load_models(workdir)
    if which is None:
        if len(models) != 1:
            raise ValueError(f"{workdir} holds {sorted(models)}; choose one with --which=encoder|decoder")
        which = next(iter(models))
    if which not in models:
        raise ValueError(f"{workdir} holds {sorted(models)}, not {which!r}")
    ckpt = Checkpoints(workdir, async_save=False)
    steps = ckpt.steps()
    if not steps:
        raise FileNotFoundError(f"{workdir} has no checkpoints")
    if step is not None and step not in steps:
        raise ValueError(f"{workdir} has no checkpoint at step {step}; it has {steps}")
    if step is None:
        step, restored = ckpt.restore_latest(log=lambda m: print(m, file=sys.stderr))
    else:
        restored = ckpt.restore(step)
    ckpt.close()
    if restored is None:
        raise ValueError(f"no checkpoint in {workdir} could be read")
    params = jax.tree_util.tree_map(jax.numpy.asarray, restored["params"][which])
    tok = os.path.join(workdir, "tokenizer")
    return params, models[which], which, tok if os.path.isdir(tok) else None
