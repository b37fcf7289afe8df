"""Sweeps: lists of config overrides defined as code beside the configs, run locally or printed for a TPU VM.

    ettin sweep --config=configs/demo.py --sweep=lr --workdir_root=runs/lr [--dry_run] [--parallel=N]
    ettin sweep --config=configs/ettin.py --sweep=size_objective --workdir_root=/mnt/B/grid --dry_run --tpu=NAME
    ettin sweep-report --workdir_root=runs/lr

A config module that has sweeps defines `get_sweep(name)` (and `SWEEPS`, the names), returning a list of points;
a point is a dict of dotted `config.` overrides, built with the helpers here (big_vision style):

    from ettin_jax.sweep import product, zip_
    def get_sweep(name):
        return {"lr": lambda: product({"config.objective": "mlm"},
                                      ("config.optimizer.peak_lr", [1e-3, 3e-3, 1e-2]))}[name]()

Each point trains in its own workdir, ROOT/<swept values> (e.g. `peak_lr=0.001`, named after the keys whose values
differ between points), with exactly the command `--dry_run` prints: `python -m ettin_jax.cli train
--config=... --workdir=... --config.k=v ...`. A point whose workdir has a checkpoint at its total_steps is complete
and skipped; any other point is started, or resumed from its latest checkpoint by the trainer. Every point is
parsed and validated against the config before anything runs: an unknown sweep, an override of a field the config
does not have, a value the trainer would refuse, two points sharing a workdir, or a workdir that holds a run with a
different config is an error naming the point, and nothing starts.

`sweep-report` reads each point's last metrics.jsonl row into ROOT/report.md and ROOT/report.csv, and plots every
swept value against the final per-model losses (ROOT/report_<key>.png).
"""
from __future__ import annotations

import csv
import ctypes
import dataclasses
import fcntl
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types
from typing import Optional, Sequence, Union

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT_FILE = "sweep_point.json"  # written into each point's workdir: which sweep, which overrides
LOG_FILE = "sweep.log"  # the point's trainer output (stdout and stderr), appended on every attempt
LOCK_FILE = "sweep.lock"  # held (flock) by the point's running trainer

Point = dict  # {"config.a.b": value}
Axis = Union[Sequence[Point], Point, tuple]


class SweepError(ValueError):
    """A sweep that cannot run as defined; raised before any point starts."""


# ------------------------------------------------------------------------------------------------- helpers


def _points(axis: Axis) -> list[Point]:
    """An axis as a list of points: ("config.k", [v1, v2]), a dict (one point: fixed overrides), or points."""
    if isinstance(axis, tuple) and len(axis) == 2 and isinstance(axis[0], str):
        key, values = axis
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise SweepError(f"sweep axis {key!r}: expected a list of values, got {values!r}")
        return [{key: v} for v in values]
    if isinstance(axis, dict):
        return [dict(axis)]
    points = list(axis)
    if not all(isinstance(p, dict) for p in points):
        raise SweepError(f"a sweep axis is (key, values), a dict of fixed overrides, or a list of dicts; got {axis!r}")
    return [dict(p) for p in points]


def _merge(parts: Sequence[Point]) -> Point:
    out = {}
    for p in parts:
        clash = sorted(set(out) & set(p))
        if clash:
            raise SweepError(f"two sweep axes set {clash[0]!r}; each key belongs to one axis")
        out.update(p)
    return out


def product(*axes: Axis) -> list[Point]:
    """Every combination of the axes (the first varies slowest), e.g.
    product(("config.size", ["tiny", "17m"]), ("config.objective", ["mlm", "clm"])) -> 4 points."""
    return [_merge(combo) for combo in itertools.product(*(_points(a) for a in axes))]


def zip_(*axes: Axis) -> list[Point]:
    """The axes side by side (equal lengths), e.g. a learning rate that goes with each size."""
    lists = [_points(a) for a in axes]
    lengths = sorted({len(l) for l in lists})
    if len(lengths) > 1:
        raise SweepError(f"zip_ of axes of different lengths {[len(l) for l in lists]}")
    return [_merge(parts) for parts in zip(*lists)]


# ------------------------------------------------------------------------------------------- config & points


def split_config_arg(config: str) -> tuple[str, Optional[str]]:
    """'configs/ettin.py:size=tiny' -> (absolute path, 'size=tiny'); the path is checked to exist."""
    path, _, arg = config.partition(":")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SweepError(f"--config={config}: no such config file {path!r}")
    return path, (arg or None)


def load_sweep(config: str, name: str) -> list[Point]:
    """The points of sweep `name` of a config module (its `get_sweep(name)`), keys normalised to `config.x`."""
    import importlib.util
    path, _ = split_config_arg(config)
    spec = importlib.util.spec_from_file_location(f"_ettin_sweep_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    known = sorted(getattr(module, "SWEEPS", {}))
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no sweeps (no get_sweep function)")
    if known and name not in known:
        raise SweepError(f"unknown sweep {name!r} in {path}; expected one of {', '.join(known)}")
    try:
        points = module.get_sweep(name)
    except (KeyError, ValueError) as e:
        raise SweepError(f"sweep {name!r} of {path}: {e}") from None
    if not points:
        raise SweepError(f"sweep {name!r} of {path} has no points")
    out = []
    for p in _points(points):
        out.append({(k if k.startswith("config.") else f"config.{k}"): v for k, v in p.items()})
    return out


def flag_value(v) -> str:
    """A Python value as `--config.k=` text that ml_collections parses back to the same value."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def override_flags(point: Point) -> list[str]:
    return [f"--{k}={flag_value(v)}" for k, v in point.items()]


def _value_name(v) -> str:
    text = flag_value(v) if not isinstance(v, float) else f"{v:g}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def point_names(points: Sequence[Point]) -> list[str]:
    """Workdir names: the keys whose values differ between points (their last dotted part, unless two keys share
    it), e.g. `size=tiny,objective=mlm`; a sweep of one point is `default`."""
    keys = swept_keys(points)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k.removeprefix("config.")) for k, s in zip(keys, last)}
    return [",".join(f"{short[k]}={_value_name(p[k])}" for k in keys if k in p) or "default" for p in points]


def swept_keys(points: Sequence[Point]) -> list[str]:
    """Keys (in first-seen order) whose value is not the same in every point."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    missing = object()
    return [k for k in keys if len({repr(p.get(k, missing)) for p in points}) > 1]


def missing_field(config, key: str) -> Optional[str]:
    """None if `config.a.b` names a field of the config, else why not (naming the nearest fields)."""
    import difflib
    node, path = config, "config"
    for part in key.split(".")[1:]:
        fields = [str(f) for f in node.keys()] if hasattr(node, "keys") else []
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=3)
            if close:
                hint = f"; did you mean {' or '.join(repr(f'{path}.{c}') for c in close)}?"
            elif fields:
                hint = f"; {path} has {', '.join(fields[:12])}{', ...' if len(fields) > 12 else ''}"
            else:
                hint = f"; {path} is a value, not a config group"
            return f"unknown config field {f'{path}.{part}'!r}{hint}"
        node, path = node[part], f"{path}.{part}"
    return None


def resolve_config(config: str, flags_: Sequence[str]):
    """The ConfigDict `ettin train --config=CONFIG FLAGS...` would train, parsed by ml_collections' config flags."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["ettin sweep", f"--config={config}", *flags_]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


@dataclasses.dataclass(eq=False)
class PlannedPoint:
    """One point: its name, overrides, workdir, train command (`python` first), and the config it trains."""
    sweep: str
    index: int
    name: str
    overrides: Point
    workdir: str
    command: list
    config: object  # the resolved ml_collections.ConfigDict

    @property
    def total_steps(self) -> int:
        return int(self.config.total_steps)

    def complete(self) -> bool:
        return run_status(self.workdir, self.config.total_steps, self.config.total_tokens) == "complete"

    def status(self) -> str:
        return run_status(self.workdir, self.config.total_steps, self.config.total_tokens)


def run_status(workdir: str, total_steps: int, total_tokens: float) -> str:
    """'complete' when the latest finished checkpoint ended its run by the trainer's rule (`train.run_complete`: the
    token budget, or total_steps); 'partial (...)' when a checkpoint exists; 'new' otherwise."""
    from ettin_jax import checkpoint, train
    steps = checkpoint.checkpoint_steps(workdir)
    if not steps:
        return "new"
    meta = checkpoint.read_meta(workdir, steps[-1]) or {}
    budget = types.SimpleNamespace(total_steps=int(total_steps or 0), total_tokens=float(total_tokens or 0))
    if train.run_complete(budget, meta.get("step", steps[-1]), meta.get("tokens", 0)):
        return "complete"
    if budget.total_tokens > 0:
        return f"partial (step {steps[-1]}, {meta.get('tokens', 0):,} of {budget.total_tokens:,.0f} tokens)"
    return f"partial (step {steps[-1]} of {budget.total_steps})"


def plan(config: str, sweep: str, workdir_root: str, common: Sequence[str] = ()) -> list[PlannedPoint]:
    """Loads, names and validates every point of a sweep; raises SweepError before anything runs."""
    from ettin_jax import checkpoint, train
    try:  # on a TPU VM as much as here: the trainer writes its workdir with local file I/O
        checkpoint.check_workdir(workdir_root)
    except ValueError as e:
        raise SweepError(f"--workdir_root: {e}") from None
    path, arg = split_config_arg(config)
    config_arg = path + (f":{arg}" if arg else "")
    points = load_sweep(config, sweep)
    names = point_names(points)
    seen = {}
    for name, p in zip(names, points):
        if name in seen:
            raise SweepError(f"sweep {sweep!r}: points {seen[name]} and {p} would share the workdir "
                             f"{os.path.join(workdir_root, name)!r}; make their overrides differ")
        seen[name] = p
    try:
        base = resolve_config(config_arg, [])
    except (Exception, SystemExit) as e:
        raise SweepError(f"--config={config}: {type(e).__name__}: {e}") from None
    for flag in common:
        why = missing_field(base, flag.removeprefix("--").split("=", 1)[0])
        if why:
            raise SweepError(f"{flag}: {why}")
    try:
        base = resolve_config(config_arg, common)
    except (Exception, SystemExit) as e:
        raise SweepError(f"{' '.join(common)}: {type(e).__name__}: {e}") from None
    root = os.path.abspath(workdir_root)
    planned = []
    for name, p in zip(names, points):
        for key in p:
            why = missing_field(base, key)
            if why:
                raise SweepError(f"sweep {sweep!r}, point {name!r} ({p}): {why}")
        flags_ = [*common, *override_flags(p)]
        try:
            resolved = resolve_config(config_arg, flags_)
        except (Exception, SystemExit) as e:  # absl flag errors, and SystemExit from a config that exits
            raise SweepError(f"sweep {sweep!r}, point {name!r}: {' '.join(override_flags(p))}: "
                             f"{type(e).__name__}: {e}") from None
        for key, v in p.items():
            got = resolved
            for part in key.split(".")[1:]:
                got = got[part]
            if got != v and not (isinstance(v, (list, tuple)) and list(got) == list(v)):
                raise SweepError(f"sweep {sweep!r}, point {name!r}: {key}={v!r} reads back as {got!r} "
                                 "from the command line; use a value of the field's type")
        try:
            train.validate_config(resolved)
        except ValueError as e:
            raise SweepError(f"sweep {sweep!r}, point {name!r}: {e}") from None
        workdir = os.path.join(root, name)
        command = ["python", "-m", "ettin_jax.cli", "train", f"--config={config_arg}", f"--workdir={workdir}",
                   *flags_]
        planned.append(PlannedPoint(sweep, len(planned), name, p, workdir, command, resolved))
    for pt in planned:
        _check_existing_run(pt)
    return planned


def _check_existing_run(pt: PlannedPoint):
    """A workdir that already holds a run with a different config (beyond the fields a resume may change) is an
    error now rather than when the trainer reaches it, or a wrong skip when it is complete."""
    from ettin_jax import train
    saved_path = os.path.join(pt.workdir, "config.json")
    if "://" in pt.workdir or not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = train._flatten(json.load(f))
    current = train._flatten(train.config_to_dict(pt.config))
    differ = sorted(k for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k) and k not in train.MUTABLE_FIELDS)
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:5])
        raise SweepError(f"point {pt.name!r}: {pt.workdir} holds a run with a different config ({shown}); "
                         "use another --workdir_root, or remove that workdir")


# ------------------------------------------------------------------------------------------------ running


def local_command(pt: PlannedPoint) -> list[str]:
    return [sys.executable, *pt.command[1:]]


def tpu_command(pt: PlannedPoint, tpu: str, zone: Optional[str], repo_dir: str) -> str:
    """The gcloud line that runs a point on every worker of a TPU VM (the repository checked out in repo_dir)."""
    args = list(pt.command[4:])
    path = args[0].removeprefix("--config=")
    if os.path.commonpath([os.path.abspath(path.split(":")[0]), REPO_ROOT]) == REPO_ROOT:
        args[0] = "--config=" + os.path.relpath(path, REPO_ROOT)  # the same file in the VM's checkout
    train_cmd = shlex.join(["ettin", "train", *args])
    remote = f"cd {shlex.quote(repo_dir)} && {train_cmd}"
    parts = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu]
    if zone:
        parts.append(f"--zone={zone}")
    parts += ["--worker=all", f"--command={remote}"]
    return shlex.join(parts)


def _set_parent_death_signal():
    """Linux: the trainer gets SIGTERM (and so saves and exits) if the sweep process dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _Runner:
    """Runs points as subprocesses, at most `parallel` at once, copying each one's output to its log."""

    def __init__(self, parallel: int, out=sys.stdout):
        self.parallel, self.out = parallel, out
        self.running: dict = {}  # Popen -> (point, pump thread)
        self.lock = threading.Lock()
        self.stop = None

    def _pump(self, proc, pt, log):
        prefix = f"[{pt.name}] " if self.parallel > 1 else ""
        for line in iter(proc.stdout.readline, ""):
            log.write(line)
            log.flush()
            with self.lock:
                self.out.write(prefix + line)
                self.out.flush()
        log.close()

    def start(self, pt: PlannedPoint) -> bool:
        """Starts the point's trainer; False if it turned out complete (an earlier trainer finished it)."""
        os.makedirs(pt.workdir, exist_ok=True)
        # The trainer inherits an flock on WORKDIR/sweep.lock; the kernel drops it only when that trainer is gone.
        # A sweep started again while an earlier sweep's trainer still runs (it was killed: the trainer got SIGTERM
        # and is saving) waits for it here rather than training the same workdir twice.
        lock = os.open(os.path.join(pt.workdir, LOCK_FILE), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with self.lock:
                print(f"sweep: {pt.name}: an earlier trainer of this point is still running; waiting for it",
                      file=self.out, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if pt.complete():
            os.close(lock)
            return False
        log = open(os.path.join(pt.workdir, LOG_FILE), "a")
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(local_command(pt))}\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(local_command(pt), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,
                                pass_fds=(lock,))
        os.close(lock)  # the child's copy holds the lock
        pump = threading.Thread(target=self._pump, args=(proc, pt, log), daemon=True)
        pump.start()
        self.running[proc] = (pt, pump)
        return True

    def poll(self) -> list:
        """(point, return code) of the processes that ended."""
        done = []
        for proc in list(self.running):
            if proc.poll() is not None:
                pt, pump = self.running.pop(proc)
                pump.join()
                done.append((pt, proc.returncode))
        return done

    def terminate(self, signum):
        # Children run in their own session (a terminal's Ctrl-C reaches only the sweep), so each gets one SIGTERM
        # here: the trainer saves a checkpoint at the next step and exits; a second Ctrl-C makes it give up at once.
        self.stop = signal.Signals(signum).name
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)


def run(points: Sequence[PlannedPoint], *, parallel: int = 1, out=sys.stdout) -> dict[str, str]:
    """Runs the points that are not complete; returns {name: 'skipped' | 'done' | 'failed (rc N)' | 'not run'}."""
    from ettin_jax import checkpoint
    results = {}
    todo = []
    for pt in points:
        if pt.complete():
            results[pt.name] = "skipped"
            last = checkpoint.checkpoint_steps(pt.workdir)[-1]
            print(f"sweep: {pt.name}: complete (checkpoint at step {last}), skipped", file=out)
        else:
            todo.append(pt)
    for pt in points:  # the record the report reads (written before training, so a point not yet run shows too)
        checkpoint.write_json(pt.workdir, POINT_FILE, dict(sweep=pt.sweep, index=pt.index, name=pt.name,
                                                          overrides=pt.overrides, command=pt.command))
    runner = _Runner(max(1, parallel), out)
    old = {s: signal.signal(s, lambda signum, _: runner.terminate(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        queue = list(todo)
        while queue or runner.running:
            while queue and len(runner.running) < runner.parallel and runner.stop is None:
                pt = queue.pop(0)
                state = pt.status()
                print(f"sweep: {pt.name}: {'resuming, ' if state.startswith('partial') else 'starting, '}"
                      f"{state}: {shlex.join(local_command(pt))}", file=out, flush=True)
                if not runner.start(pt):
                    results[pt.name] = "done"
                    print(f"sweep: {pt.name}: completed by an earlier trainer", file=out)
            if runner.stop is not None:
                for pt in queue:
                    results[pt.name] = "not run"
                queue = []
            for pt, rc in runner.poll():
                ok = rc == 0 and pt.complete()
                results[pt.name] = "done" if ok else (f"stopped ({runner.stop})" if runner.stop else
                                                      f"failed (rc {rc}; see {os.path.join(pt.workdir, LOG_FILE)})")
                print(f"sweep: {pt.name}: {results[pt.name]}", file=out)
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return {pt.name: results.get(pt.name, "not run") for pt in points}


# ------------------------------------------------------------------------------------------------- report


REPORT_METRICS = ("loss", "encoder/loss", "encoder/accuracy", "decoder/loss", "decoder/accuracy", "tokens_per_sec")


def _last_row(path: str) -> dict:
    last = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        last = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        pass
    return last


def gather(workdir_root: str) -> tuple[list[str], list[dict]]:
    """(swept keys, rows): one row per point workdir under the root, with its overrides and last metrics."""
    points = []
    for name in sorted(os.listdir(workdir_root)) if os.path.isdir(workdir_root) else []:
        wd = os.path.join(workdir_root, name)
        record = os.path.join(wd, POINT_FILE)
        if os.path.isfile(record):
            with open(record) as f:
                points.append((wd, json.load(f)))
    if not points:
        raise SweepError(f"no sweep points under {workdir_root!r} (folders with {POINT_FILE}); "
                         "run `ettin sweep` with this --workdir_root first")
    points.sort(key=lambda t: (t[1].get("sweep", ""), t[1].get("index", 0), t[1]["name"]))  # the sweep's order
    keys = swept_keys([p["overrides"] for _, p in points]) or list(dict.fromkeys(
        k for _, p in points for k in p["overrides"]))
    rows = []
    for wd, p in points:
        metrics = _last_row(os.path.join(wd, "metrics.jsonl"))
        saved = os.path.join(wd, "config.json")
        budget = {}
        if os.path.exists(saved):
            with open(saved) as f:
                budget = json.load(f)
        status = run_status(wd, budget.get("total_steps", 0), budget.get("total_tokens", 0))
        status = "not started" if status == "new" else status
        rows.append(dict(point=p["name"], **{k: p["overrides"].get(k) for k in keys}, status=status,
                         **metrics))
    return keys, rows


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def report(workdir_root: str, out_dir: Optional[str] = None) -> dict[str, str]:
    """Writes report.md, report.csv and report_<key>.png (one per swept key); returns {kind: path}."""
    keys, rows = gather(workdir_root)
    out_dir = out_dir or workdir_root
    os.makedirs(out_dir, exist_ok=True)
    metric_cols = [m for m in REPORT_METRICS if any(m in r for r in rows)]
    short = [k.removeprefix("config.") for k in keys]
    cols = ["point", *keys, "status", "step", *metric_cols]
    header = ["point", *short, "status", "step", *metric_cols]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    paths = {"md": os.path.join(out_dir, "report.md"), "csv": os.path.join(out_dir, "report.csv")}
    with open(paths["md"], "w") as f:
        f.write("\n".join(md) + "\n")
    all_cols = ["point", *keys, "status"] + sorted({k for r in rows for k in r} - {"point", "status", *keys})
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", *short, "status", *all_cols[len(keys) + 2:]])
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in all_cols])
    for key in keys:
        paths[f"plot:{key}"] = _plot(rows, keys, key, os.path.join(out_dir, f"report_{_value_name(key.removeprefix('config.'))}.png"))
    return paths


def _plot(rows, keys, key, path) -> str:
    """Each per-model final loss against one swept value; one line per setting of the other swept values."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (safe inside notebooks)
    losses = [m for m in ("encoder/loss", "decoder/loss") if any(m in r for r in rows)] or ["loss"]
    xs = [r.get(key) for r in rows]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs if x is not None)
    categories = list(dict.fromkeys(_fmt(x) for x in xs))
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    others = [k for k in keys if k != key]
    for metric in losses:
        groups = {}
        for r in rows:
            if metric in r and r.get(key) is not None:
                label = ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(r.get(k))}" for k in others)
                groups.setdefault(label, []).append((r[key], r[metric]))
        for label, pts in groups.items():
            pts.sort(key=lambda t: t[0] if numeric else categories.index(_fmt(t[0])))
            x = [p[0] if numeric else categories.index(_fmt(p[0])) for p in pts]
            ax.plot(x, [p[1] for p in pts], marker="o", label=f"{metric}" + (f" ({label})" if label else ""))
    if numeric:
        vals = [x for x in xs if x is not None]
        if vals and min(vals) > 0 and max(vals) / min(vals) >= 10:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(key.removeprefix("config."))
    ax.set_ylabel("final loss")
    ax.set_title(f"final loss vs {key.removeprefix('config.')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------- CLI


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--config.x=y` flags apply to every point (e.g. --config.total_steps=30); absl sees the rest."""
    common = [a for a in argv[1:] if a.startswith("--config.")]
    return [argv[0]] + [a for a in argv[1:] if not a.startswith("--config.")], common


def main(argv, subcommand="sweep"):
    from absl import flags
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir_root", None, "the folder holding one workdir per point", flag_values=fv)
    if subcommand == "sweep":
        flags.DEFINE_string("config", None, "config file with big_vision-style :args, e.g. configs/demo.py",
                            flag_values=fv)
        flags.DEFINE_string("sweep", None, "the sweep's name in the config module (its get_sweep)", flag_values=fv)
        flags.DEFINE_bool("dry_run", False, "print each point's command and state; run nothing", flag_values=fv)
        flags.DEFINE_integer("parallel", 1, "points trained at once", flag_values=fv)
        flags.DEFINE_string("tpu", None, "with --dry_run: print the gcloud command that runs each point on this "
                            "TPU VM", flag_values=fv)
        flags.DEFINE_string("zone", None, "the TPU VM's zone (for --tpu)", flag_values=fv)
        flags.DEFINE_string("tpu_repo_dir", "ettin-jax", "the repository's folder on the TPU VM", flag_values=fv)
    else:
        flags.DEFINE_string("out", None, "where the report goes (default: the workdir root)", flag_values=fv)
    argv, common = _split_overrides(list(argv))
    name = argv[0]
    from ettin_jax import cli
    rest = cli.parse_flags(fv, argv, "--config=FILE[:ARGS] --sweep=NAME --workdir_root=DIR [--dry_run [--tpu=VM "
                                     "--zone=Z]] [--parallel=N] [--config.x=y ...]" if subcommand == "sweep" else
                           "--workdir_root=DIR [--out=DIR]")
    if isinstance(rest, int):
        return rest
    if not fv.workdir_root:
        print(f"{name}: --workdir_root is required", file=sys.stderr)
        return 2
    if subcommand == "sweep-report":
        if common:
            print(f"{name}: takes no --config.* flags (got {' '.join(common)})", file=sys.stderr)
            return 2
        try:
            paths = report(fv.workdir_root, fv.out)
        except SweepError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        with open(paths["md"]) as f:
            print(f.read(), end="")
        for kind, path in paths.items():
            print(f"wrote {path}")
        return 0
    for flag in ("config", "sweep"):
        if not fv[flag].value:
            print(f"{name}: --{flag} is required", file=sys.stderr)
            return 2
    if fv.tpu and not fv.dry_run:
        print(f"{name}: --tpu only prints the gcloud commands; add --dry_run (and run them, or paste them into "
              "your launcher)", file=sys.stderr)
        return 2
    if fv.parallel < 1:
        print(f"{name}: --parallel={fv.parallel}; expected >= 1", file=sys.stderr)
        return 2
    if "://" in fv.workdir_root and not fv.dry_run:
        print(f"{name}: runs locally need a local --workdir_root (got {fv.workdir_root!r}); remote roots are "
              "for --dry_run --tpu", file=sys.stderr)
        return 2
    try:
        points = plan(fv.config, fv.sweep, fv.workdir_root, common)
    except SweepError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    if fv.dry_run:
        for pt in points:
            print(f"# {pt.name}: {pt.status()}")
            print(tpu_command(pt, fv.tpu, fv.zone, fv.tpu_repo_dir) if fv.tpu else
                  f"cd {shlex.quote(REPO_ROOT)} && {shlex.join(local_command(pt))}")
        return 0
    results = run(points, parallel=fv.parallel)
    bad = {n: r for n, r in results.items() if r not in ("done", "skipped")}
    print(f"sweep {fv.sweep}: " + ", ".join(f"{n}: {r}" for n, r in results.items()))
    if bad:
        return 1
    print(f"report: ettin sweep-report --workdir_root={shlex.quote(fv.workdir_root)}")
    return 0
