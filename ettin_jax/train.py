"""`ettin train`: any Ettin phase, any size, MLM or CLM or both at once (paired), resumable.

    ettin train --config=configs/ettin.py:size=150m,objective=mlm,phase=pretrain --workdir=DIR [--config.x=y ...]

The state is `params` and `opt_state`, each a dict keyed by architecture ('encoder' and/or 'decoder'); a paired run
trains both on the very same batch (one data pipeline, two parameter trees, one jitted step). The step is a pure
function (params, opt_state, batch, tokens_seen) -> (params, opt_state, metrics); dropout keys are folded from
(seed, step, architecture), and a step whose loss or gradient is not finite leaves the state untouched, so a NaN can
never reach a checkpoint. The host loop only feeds batches, logs, and saves.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ettin_jax import batch_warmup
from ettin_jax import checkpoint as ckpt_lib
from ettin_jax import init_from
from ettin_jax.errors import ConfigError
from ettin_jax import flops as flops_lib
from ettin_jax import objectives, optim, recipe, sharding, sizes
from ettin_jax.model import Ettin, ModelConfig, abstract_params, init_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields that may change between a run and its resumption without --allow_config_change.
# data.on_bad_sample / max_skip_fraction / verify_hashes: a run stopped by bad data resumes with them changed (they
# decide what happens to bad input, never which batches good input makes).
MUTABLE_FIELDS = ("log_every_steps", "checkpoint_every_steps", "checkpoint_every_tokens", "keep_last",
                  "data.num_workers", "total_steps", "data.on_bad_sample", "data.max_skip_fraction",
                  "data.verify_hashes")


# ----------------------------------------------------------------------------------------------- set-up


def model_configs(config, special_ids: Optional[dict] = None) -> dict[str, ModelConfig]:
    """{architecture: ModelConfig} for the models a config trains."""
    fields = dict(config.model)
    window = fields.pop("decoder_window", -1)
    fields["decoder_window"] = None if window is None or window < 0 else int(window)
    if special_ids:
        fields.update(pad_token_id=special_ids["pad"], cls_token_id=special_ids["cls"],
                      sep_token_id=special_ids["sep"], mask_token_id=special_ids["mask"],
                      unk_token_id=special_ids["unk"])
    out = {}
    for arch in recipe.models_of(config):
        try:
            out[arch] = sizes.model_config(config.size, **{**fields, **dict(config.model_overrides[arch])})
        except TypeError as e:
            raise ConfigError(f"config.model: {e}") from None
    return out


def validate_config(config):
    """Everything that can be checked without data or devices."""
    for name, valid in (("size", sizes.SIZES), ("objective", recipe.OBJECTIVES), ("phase", recipe.PHASES)):
        if config[name] not in valid:
            raise ConfigError(f"unknown {name} {config[name]!r}; expected one of {', '.join(valid)}")
    try:
        models = model_configs(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for arch, m in models.items():
        if config.seq_len > m.max_position_embeddings:
            raise ConfigError(f"seq_len {config.seq_len} is above max_position_embeddings "
                              f"{m.max_position_embeddings} of the {arch}")
    if config.total_tokens <= 0 and config.total_steps <= 0:
        raise ConfigError(f"the run has no length: total_tokens is {config.total_tokens} and total_steps is "
                          f"{config.total_steps}; set --config.total_tokens (non-pad tokens) or --config.total_steps")
    if config.micro_batch_size and config.global_batch_size % config.micro_batch_size:
        raise ConfigError(f"global_batch_size {config.global_batch_size} is not divisible by micro_batch_size "
                          f"{config.micro_batch_size}")
    if config.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite is {config.nonfinite!r}; expected 'stop' or 'skip'")
    if config.init_mode not in ("none", "full", "weights"):
        raise ConfigError(f"init_mode is {config.init_mode!r}; expected none, full or weights")
    if config.init_mode != "none" and not config.init_from:
        raise ConfigError(f"phase {config.phase!r} starts from a previous run: set --config.init_from=WORKDIR "
                          "(or an HF folder)")
    recipe.models_of(config)
    try:
        make_optimizer(config)  # the schedule's own checks (e.g. warmup + decay within the horizon), before any data
    except ValueError as e:
        raise ConfigError(f"config.schedule ({config.schedule.name} over a horizon of {schedule_horizon(config):,.0f} "
                          f"tokens, {_horizon_source(config)}): {e}") from None
    return models


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_to_dict(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


def check_resume_config(workdir: str, config, allow_change: bool):
    """Refuses to resume a workdir whose run had a different config, naming the fields. Writes nothing: the
    trainer records config.json only once the whole config has been validated."""
    saved = ckpt_lib.read_json(workdir, "config.json")
    if saved is None:
        return
    a, b = _flatten(saved), _flatten(config_to_dict(config))
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in MUTABLE_FIELDS)
    if differ and not allow_change:
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:8])
        raise ConfigError(f"{workdir} holds a run with a different config ({shown}"
                          f"{'; ...' if len(differ) > 8 else ''}); use another workdir, or pass "
                          "--allow_config_change to resume it anyway")


def schedule_horizon(config) -> float:
    """The LR schedule's horizon in non-pad tokens: where the run ends (see `run_complete`).

    That is the token budget config.total_tokens; total_steps, a cap on top of it, only stops a run early and leaves
    the schedule alone. Without a token budget total_steps ends the run, and the horizon is its capacity,
    total_steps x global_batch_size x seq_len: a padded run's non-pad tokens fall short of it by the pad fraction.
    """
    if config.total_tokens > 0:
        return float(config.total_tokens)
    return float(config.total_steps * config.global_batch_size * config.seq_len)


def _horizon_source(config) -> str:
    if config.total_tokens > 0:
        return "config.total_tokens"
    return (f"total_steps x global_batch_size x seq_len = {config.total_steps} x {config.global_batch_size} x "
            f"{config.seq_len}")


def run_complete(config, step: int, tokens_seen: int) -> bool:
    """Whether a run that has taken `step` steps over `tokens_seen` non-pad tokens is finished: at its token budget
    (total_tokens), or at total_steps (a cap; the budget when total_tokens is 0). Both counts are restored on resume,
    so a resumed run ends at the same step as an uninterrupted one."""
    return ((config.total_tokens > 0 and tokens_seen >= config.total_tokens)
            or (config.total_steps > 0 and step >= config.total_steps))


def make_optimizer(config):
    o = config.optimizer
    tx = optim.injectable_stable_adamw(max_learning_rate=o.peak_lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay)
    s = config.schedule
    total = schedule_horizon(config)
    warmup = s.warmup_frac * total if s.warmup_frac else s.warmup_tokens
    decay = s.decay_frac * total if s.decay_frac else s.decay_tokens
    if s.name == "warmup_constant":
        schedule = optim.warmup_constant(o.peak_lr, warmup)
    elif s.name == "one_minus_sqrt":
        schedule = optim.one_minus_sqrt(o.peak_lr, total, s.start_frac, s.end_frac)
    elif s.name == "warmup_stable_decay":
        schedule = optim.warmup_stable_decay(o.peak_lr, warmup, total, decay, s.final_frac)
    else:
        schedule = optim.make_schedule(s.name)  # raises the clear error for an unknown name
    return tx, schedule


# ------------------------------------------------------------------------------------------------ step


def make_train_step(models: dict[str, ModelConfig], config, tx, schedule):
    """The pure training step over every model the config trains."""
    objs = recipe.models_of(config)
    modules = {arch: Ettin(cfg) for arch, cfg in models.items()}

    def losses(params, batch, step, normalizers=None):
        total, metrics = 0.0, {}
        for i, (arch, name) in enumerate(sorted(objs.items())):
            obj = objectives.get_objective(name)
            rng = None
            if models[arch].attention_dropout > 0:
                rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), step), i)
            loss, m = objectives.loss_fn(params[arch], batch, model=modules[arch], objective=obj,
                                         dropout_rng=rng, chunk=config.ce_chunk,
                                         normalizer=None if normalizers is None else normalizers[arch])
            total = total + loss
            metrics.update({f"{arch}/{k}": v for k, v in m.items()})
        return total, metrics

    def grads_and_metrics(params, batch, step):
        # The batch's rows, not global_batch_size: a batch-size warmup step has fewer (`batch_warmup`).
        n_micro = batch["tokens"].shape[0] // config.micro_batch_size if config.micro_batch_size else 1
        if n_micro == 1:
            return jax.value_and_grad(losses, has_aux=True)(params, batch, step)
        # Gradient accumulation. Each micro-batch's CE sum is divided by the whole batch's prediction count, so the
        # summed losses and gradients equal the full batch's mean exactly (up to fp32 summation order). Strided
        # micro-batches (rows i, i+n, i+2n, ...) span every data shard, so no device idles.
        counts = {arch: objectives.prediction_count(objectives.get_objective(o), batch) for arch, o in objs.items()}
        micro = jax.tree_util.tree_map(lambda x: x.reshape(-1, n_micro, *x.shape[1:]).swapaxes(0, 1), batch)

        def one(mb):
            return jax.value_and_grad(losses, has_aux=True)(params, mb, step, counts)

        def body(acc, mb):
            return jax.tree_util.tree_map(jnp.add, acc, one(mb)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, first))
        ((loss, m), g), _ = jax.lax.scan(body, zero, micro)
        return (loss, m), g

    def step_fn(params, opt_state, batch, step, tokens_seen):
        (loss, metrics), grads = grads_and_metrics(params, batch, step)
        lr = schedule(tokens_seen)
        opt_state1 = optim.set_learning_rate(opt_state, lr)
        updates, new_opt = tx.update(grads, opt_state1, params)
        new_params = optax.apply_updates(params, updates)
        gnorms = {arch: optax.global_norm(grads[arch]) for arch in grads}
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(g) for g in gnorms.values()]))
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        rms = optim.update_rms(new_opt)
        metrics.update({f"{arch}/grad_norm": g for arch, g in gnorms.items()})
        metrics.update({f"{arch}/update_rms": jnp.mean(jnp.stack(jax.tree_util.tree_leaves(rms[arch])))
                        for arch in grads})
        metrics.update(loss=loss, lr=lr, nonfinite=~finite)
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    return step_fn


def jit_train_step(models: dict[str, ModelConfig], config, tx, schedule, mesh, params, opt_state):
    """The jitted step `train` runs: state donated, state and batch sharded as given by `params` / `opt_state`
    (arrays or ShapeDtypeStructs with shardings) and `sharding.batch_sharding`. `ettin compile` compiles the same."""
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, (params, opt_state))
    return jax.jit(make_train_step(models, config, tx, schedule), donate_argnums=(0, 1),
                   in_shardings=(*state_shardings, sharding.batch_sharding(mesh), None, None),
                   out_shardings=(*state_shardings, None))


def abstract_batch(config, mesh, rows: Optional[int] = None) -> dict:
    """ShapeDtypeStructs (sharded over the batch axes) of the global batch of `rows` rows (default: the global
    batch size) the data pipeline gives the step."""
    from ettin_jax.data import masking
    b, t = rows or config.global_batch_size, config.seq_len
    sh = sharding.batch_sharding(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    batch = {k: spec((b, t), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    if any(objectives.get_objective(o).masked_inputs for o in recipe.models_of(config).values()):
        p = masking.num_mlm_slots(config.mlm_rate, t)
        batch.update(mlm_inputs=spec((b, t), jnp.int32), mlm_positions=spec((b, p), jnp.int32),
                     mlm_labels=spec((b, p), jnp.int32), mlm_weights=spec((b, p), jnp.float32))
    return batch


def check_memory(compiled, mesh, config, log=print):
    """Refuses (ConfigError) a compiled step whose peak memory per device exceeds the device's memory, naming the
    compiler's figure and the knobs, instead of an out-of-memory error mid-run. Silent where the backend reports no
    memory figure."""
    from ettin_jax import compile as compile_lib
    device = mesh.devices.flat[0]
    try:
        figures = compile_lib.memory_figures(compiled)
    except Exception:  # a backend without memory analysis
        return None
    have = compile_lib.hbm_bytes(device)
    if have and figures["peak_bytes"] > have:
        gib = compile_lib.GiB
        raise ConfigError(
            f"the compiled train step needs {figures['peak_bytes'] / gib:.2f} GiB per device (temporaries "
            f"{figures['temp_bytes'] / gib:.2f} GiB) but a {device.device_kind} device has {have / gib:.2f} GiB; "
            f"lower --config.micro_batch_size (now {config.micro_batch_size or 'off'}) or --config.global_batch_size "
            f"(now {config.global_batch_size}), set --config.model.remat=full, shard over more devices "
            "(--config.mesh.fsdp), or add `runlocal` to the config argument for a CPU-sized run")
    return figures


# ------------------------------------------------------------------------------------------------ state



def abstract_state(models, config, mesh, tx, rules):
    """(params, opt_state) as ShapeDtypeStructs with the shardings `init_state` gives them; allocates nothing."""
    params = {}
    for arch, cfg in sorted(models.items()):
        shapes, specs = abstract_params(cfg)
        shard = sharding.fit_shardings(sharding.param_shardings(specs, mesh, rules), shapes)
        params[arch] = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                              shapes, shard)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = sharding.like_params(opt, params, mesh)
    opt_state = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt,
                                       opt_sh)
    return params, opt_state


def init_state(models, config, mesh, tx, rules, log):
    """Fresh (or phase-initialised) params and optimizer state, sharded on the mesh."""
    params, shardings = {}, {}
    for i, (arch, cfg) in enumerate(sorted(models.items())):
        shapes, specs = abstract_params(cfg)
        shardings[arch] = sharding.fit_shardings(sharding.param_shardings(specs, mesh, rules), shapes)
        # Paired models start from different keys: they are two independent models trained on the same data.
        key = jax.random.fold_in(jax.random.key(config.seed), i)
        params[arch] = jax.jit(lambda k, cfg=cfg: init_params(cfg, k), out_shardings=shardings[arch])(key)
    opt_state = None
    if config.init_mode != "none":
        params, opt_state = init_from.load_initial(config, models, params, tx, log, rules)
    if opt_state is None:
        # Explicit out_shardings: the moments must be sharded like the parameters (FSDP), not left replicated.
        opt_sh = sharding.like_params(jax.eval_shape(tx.init, params), params, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return params, opt_state


# ------------------------------------------------------------------------------------------------- loop


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsWriter:
    """metrics.jsonl (one object per logged step) + TensorBoard event files."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        # Drop lines past the checkpoint we resume from (written, then lost); process 0 is the only writer.
        if os.path.exists(self.path) and jax.process_index() == 0:
            with open(self.path) as f:
                keep = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        self.tb = None
        if jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except Exception:  # TensorBoard is a convenience; metrics.jsonl is the record
                self.tb = None

    def write(self, step: int, metrics: dict):
        if jax.process_index() != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self):
        tb, self.tb = self.tb, None
        if tb:
            try:
                tb.close()
            except OSError:  # a full or read-only disk: the run's own error says so; metrics.jsonl is the record
                tb.event_writer._closed = True  # else tensorboardX's atexit hook flushes again, with a traceback


def global_batch_hash(row_hashes: list[str]) -> str:
    """The hash of the global batch from this host's row hashes: every process's rows gathered in global row order
    (process i holds rows [i*b, (i+1)*b)), so a run on 1 or N hosts logs the same hash for the same batch. A
    collective on a multi-process run: every process calls it at the same steps."""
    from ettin_jax.data import batch_hash
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        local = np.frombuffer(bytes.fromhex("".join(row_hashes)), np.uint8).reshape(len(row_hashes), -1)
        gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, local.shape[1])
        row_hashes = [bytes(r).hex() for r in gathered]
    return batch_hash(row_hashes)


def warmup_schedule(config, mesh, pipe) -> Optional[batch_warmup.Schedule]:
    """The batch-size warmup's schedule for this run, or None (no warmup: every step is the global batch)."""
    bw = config.batch_size_warmup
    if not bw.tokens:
        return None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    unit = batch_warmup.granule(config.global_batch_size, pipe.num_streams, dp, config.micro_batch_size)
    start = bw.start or config.micro_batch_size or unit  # Ettin: from the micro-batch size
    return batch_warmup.Schedule(config.global_batch_size, start, bw.tokens, bw.num_sizes, unit)


def train(config, workdir: str, *, allow_config_change: bool = False, log=print,
          command: Optional[str] = None) -> dict:
    """Runs (or resumes) a training run in `workdir`; returns the last logged metrics.

    `command` (the `ettin train` command line) is appended to the workdir's commands.jsonl, which `ettin export`
    quotes in the model card."""
    from ettin_jax import data as data_lib
    from ettin_jax.tokenizer import check_compatible

    # Everything is checked before anything is written into the workdir, so a refused config leaves it as it was
    # (a fixed command then runs there): the config, the mesh, the resume, the data, the tokenizer, init_from.
    ckpt_lib.check_workdir(workdir)
    models = validate_config(config)
    mesh = sharding.make_mesh(config.mesh)
    for cfg in models.values():
        sharding.validate(cfg, mesh, config.global_batch_size, seq_len=config.seq_len,
                          micro_batch_size=config.micro_batch_size)
    check_resume_config(workdir, config, allow_config_change)
    objs = recipe.models_of(config)
    masked = any(objectives.get_objective(o).masked_inputs for o in objs.values())
    pipe = data_lib.make_pipeline(config.data, seq_len=config.seq_len, global_batch_size=config.global_batch_size,
                                  seed=config.seed, mlm_rate=config.mlm_rate if masked else 0.0,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())
    tok = pipe.tokenizer
    models = model_configs(config, tok.special_ids)
    for arch, cfg in models.items():
        check_compatible(tok, cfg.vocab_size, {k: getattr(cfg, f"{k}_token_id") for k in
                                               ("pad", "cls", "sep", "mask", "unk")})
    # init_from only starts a run: a resume restores the workdir's own state.
    if config.init_mode != "none" and not ckpt_lib.checkpoint_steps(workdir):
        init_from.check_init_source(config, models, tok)
    if jax.process_index() == 0:  # one writer: processes sharing a workdir would race on the temporary files
        ckpt_lib.write_json(workdir, "config.json", config_to_dict(config))
        if command:
            ckpt_lib.append_jsonl(workdir, "commands.jsonl", dict(
                command=command, start_step=(ckpt_lib.checkpoint_steps(workdir) or [0])[-1],
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
        ckpt_lib.save_models(workdir, models)
        ckpt_lib.copy_tokenizer(tok.path, os.path.join(workdir))

    rules = sharding.rules(config)
    tx, schedule = make_optimizer(config)
    tokens_per_step = config.global_batch_size * config.seq_len
    # Besides every checkpoint_every_steps, a checkpoint every checkpoint_every_tokens (Ettin: 8.5B), kept forever.
    keep_period = None
    if config.checkpoint_every_tokens:
        keep_period = max(1, round(config.checkpoint_every_tokens / tokens_per_step))
    checkpoints = ckpt_lib.Checkpoints(workdir, keep_last=config.keep_last, keep_period=keep_period)

    with jax.set_mesh(mesh), __import__("flax").linen.logical_axis_rules(rules):
        params, opt_state = None, None
        start_step, tokens_seen = 0, 0
        warmup = warmup_schedule(config, mesh, pipe)
        rows_seen = 0  # global rows trained on (with a batch-size warmup, steps differ in size)

        def feed_from(data_step=0):  # a warmup's steps take rows from the stream (batch_warmup.RowFeed)
            it = pipe.iterator(data_step)
            if warmup is None:
                return it
            return batch_warmup.RowFeed(it, global_batch_size=config.global_batch_size,
                                        rows_per_group=pipe.rows_per_group, shard_index=jax.process_index(),
                                        shard_count=jax.process_count())

        data_iter = feed_from(0)
        if checkpoints.steps():
            # Resume: fresh state only for its shapes and shardings, then everything from the workdir.
            fresh_params, fresh_opt = init_state(models, without_init(config), mesh, tx, rules, log)
            step, restored = checkpoints.restore_latest(log=log, params=sharding.abstract(fresh_params),
                                                        opt_state=sharding.abstract(fresh_opt))
            if restored is None:
                log("no readable checkpoint; starting from scratch")
            else:
                params, opt_state = restored["params"], restored["opt_state"]
                start_step, tokens_seen = step, int(restored["meta"]["tokens"])
                rows_seen = int(restored["meta"].get("rows", step * config.global_batch_size))
                try:
                    checkpoints.restore(step, params=sharding.abstract(params), data_iter=data_iter)
                except Exception as e:  # e.g. a different host count: replay the stream to this step instead
                    log(f"data iterator state not restored ({str(e).splitlines()[0][:160]}); "
                        f"replaying the data stream to step {step}")
                    data_step, skip = divmod(rows_seen, config.global_batch_size)
                    data_iter = feed_from(data_step)
                    if skip:  # the rows of that data batch trained before the checkpoint
                        data_iter.take(skip // jax.process_count())
                newest = checkpoints.steps()[-1]
                note = "" if step == newest else f", the newest readable checkpoint (newest on disk: {newest})"
                log(f"resumed from step {step} ({tokens_seen:,} tokens){note}")
                checkpoints.quarantine_after(step, log=log)
        if params is None:
            params, opt_state = init_state(models, config, mesh, tx, rules, log)

        # Compiled before the first batch: a step that cannot fit is refused with the compiler's figure
        # (check_memory), not met as an out-of-memory error mid-run. A warmup's smaller sizes compile when first
        # used (at most batch_size_warmup.num_sizes of them); the full batch, the largest, is checked first.
        jitted = jit_train_step(models, config, tx, schedule, mesh, params, opt_state)
        compiled = {}

        def step_for(rows):
            if rows not in compiled:
                compiled[rows] = jitted.lower(
                    sharding.abstract(params), sharding.abstract(opt_state), abstract_batch(config, mesh, rows),
                    jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)).compile()
                check_memory(compiled[rows], mesh, config, log)
            return compiled[rows]

        step_for(config.global_batch_size)
        if warmup is not None:
            log(f"batch-size warmup over {config.batch_size_warmup.tokens:,.0f} tokens: sizes {warmup.sizes}")

        peak = flops_lib.Peak(config.model.dtype, mesh.devices.size, log=log)  # logs where its figure comes from
        writer = MetricsWriter(workdir, start_step)
        from ettin_jax.data import ProvenanceWriter
        provenance = ProvenanceWriter(workdir)
        bar = _progress(config, start_step, tokens_seen)
        until = [f"{config.total_tokens:,.0f} non-pad tokens"] if config.total_tokens > 0 else []
        until += [f"step {config.total_steps}"] if config.total_steps > 0 else []
        log(f"training {', '.join(f'{a} ({o})' for a, o in sorted(objs.items()))} of size {config.size}, "
            f"phase {config.phase}: from step {start_step} ({tokens_seen:,} tokens) until {' or '.join(until)}, "
            f"{config.global_batch_size} x {config.seq_len} tokens per step, mesh {dict(mesh.shape)}")

        last_metrics, pending = {}, None
        window = dict(t=time.perf_counter(), tokens=0, flops=0.0, steps=0)
        stopped = None

        def finish(pending_item):
            nonlocal last_metrics, stopped
            s, m_dev, ntok, nflops, row_hashes, last = pending_item
            m = jax.device_get(m_dev)
            window["tokens"] += ntok
            window["flops"] += nflops
            window["steps"] += 1
            if bool(m["nonfinite"]):
                msg = f"non-finite loss or gradient at step {s} (loss {float(m['loss'])})"
                if config.nonfinite == "stop":
                    stopped = msg
                    return
                log(msg + "; step skipped (nonfinite=skip), state unchanged")
            if (s + 1) % config.log_every_steps == 0 or last:
                dt = time.perf_counter() - window["t"]
                out = {k: float(v) for k, v in m.items() if k != "nonfinite"}
                out.update(tokens_per_sec=window["tokens"] / dt, step_time=dt / window["steps"],
                           mfu=peak.mfu(window["flops"] / dt), tokens_seen=tokens_seen)
                if row_hashes is not None:  # the global batch's hash, whatever the host count: compare runs with it
                    out["batch_hash"] = global_batch_hash(row_hashes)
                writer.write(s + 1, out)
                last_metrics = out
                losses = "  ".join(f"{a} {out[f'{a}/loss']:.3f}" for a in sorted(objs))
                line = (f"step {s + 1:>6}  {losses}  lr {out['lr']:.2e}  {out['tokens_per_sec']:,.0f} tok/s  "
                        f"mfu {out['mfu']:.1%}")
                bar.write(line) if bar else log(line)
                window.update(t=time.perf_counter(), tokens=0, flops=0.0, steps=0)

        try:
            with _Preemption() as preempt:
                step = start_step
                while not run_complete(config, step, tokens_seen):
                    if warmup is None:
                        batch = next(data_iter)
                        record = batch.pop("provenance", None)
                        batch.pop("step", None)
                        rows_now = config.global_batch_size
                    else:
                        rows_now = warmup.size(tokens_seen)
                        batch, prov_rows, _ = data_iter.take(rows_now // jax.process_count())
                        record = {"step": step, "shard_index": jax.process_index(),
                                  "shard_count": jax.process_count(), "rows": prov_rows,
                                  "hash": data_lib.batch_hash([r["hash"] for r in prov_rows])} if prov_rows else None
                    if record is not None:
                        provenance.write(record)
                    local_tokens = int((batch["segment_ids"] > 0).sum())
                    # Global counts, summed over processes: tokens_seen drives the learning rate, which every process
                    # must pass identically to the step (and equal to a single-process run's).
                    local_preds = float(batch["mlm_weights"].sum()) if "mlm_weights" in batch else 0.0
                    ntok, npreds = sharding.process_sum(local_tokens, local_preds)
                    ntok = int(ntok)
                    nflops = 0.0
                    for arch, o in objs.items():
                        nflops += objectives.get_objective(o).train_flops(models[arch], tokens=ntok, masked=npreds,
                                                                          seq_len=config.seq_len)
                    gbatch = sharding.host_batch_to_global(batch, mesh)
                    params, opt_state, m = step_for(rows_now)(params, opt_state, gbatch, jnp.int32(step),
                                                              jnp.float32(tokens_seen))
                    rows_seen += rows_now
                    if pending is not None:
                        finish(pending)
                    tokens_seen += ntok
                    step += 1
                    done = run_complete(config, step, tokens_seen)
                    pending = (step - 1, m, ntok, nflops, [r["hash"] for r in record["rows"]] if record else None, done)
                    if bar:
                        bar.update(ntok if config.total_tokens > 0 else 1)
                    if stopped:
                        break
                    if (step % config.checkpoint_every_steps == 0 or (keep_period and step % keep_period == 0)
                            or done or preempt.signal):
                        finish(pending)
                        pending = None
                        if stopped:
                            break
                        checkpoints.save(step, params=params, opt_state=opt_state, data_iter=data_iter,
                                         meta=dict(step=step, tokens=tokens_seen, rows=rows_seen, phase=config.phase))
                        # The bad-input counts survive a crash: written with every checkpoint, not only at the end.
                        _write_data_stats(workdir, pipe)
                    if preempt.signal:
                        checkpoints.wait()
                        log(f"{preempt.signal}: saved step {step}; rerun the same command to resume")
                        break
                if pending is not None and not stopped:
                    finish(pending)
        finally:  # an in-flight asynchronous save completes even when the loop raises: it holds a good step
            try:
                checkpoints.close()  # raises a save's error (a full disk) when the save fails in the background
            finally:
                writer.close()
        if bar:
            bar.close()
        if stopped:
            good = checkpoints.steps()
            raise RuntimeError(f"{stopped}; stopped. The last good checkpoint is step "
                               f"{good[-1] if good else 'none'} (untouched); set --config.nonfinite=skip to skip "
                               "such steps instead")
    _write_data_stats(workdir, pipe)
    return last_metrics


def _write_data_stats(workdir, pipe):
    """data_stats.json: the pipeline's counters (rows, tokens, pad tokens, bad inputs) so far."""
    if jax.process_index() == 0:
        ckpt_lib.write_json(workdir, "data_stats.json", pipe.stats())


def without_init(config):
    """The config with phase initialisation switched off (a resume restores everything from the workdir; `ettin
    compile` needs no source: the step does not depend on where the weights come from)."""
    c = config.copy_and_resolve_references()
    c.init_mode = "none"
    return c


def _progress(config, start_step: int, tokens_seen: int):
    """A terminal progress bar over the run's budget: tokens when it has a token budget, else steps."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if config.total_tokens > 0:
        return tqdm(total=int(config.total_tokens), initial=tokens_seen, unit="tok", unit_scale=True,
                    dynamic_ncols=True)
    return tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True)


# -------------------------------------------------------------------------------------------------- CLI


USAGE = ("--config=configs/ettin.py:size=SIZE,objective=OBJECTIVE,phase=PHASE --workdir=DIR "
         "[--config.x=y ...]")


def main(argv, subcommand=None) -> int:
    """`ettin train`: flags in a private registry, so that a bad one is one line on stderr and exit status 2."""
    from absl import flags, logging
    from ettin_jax import cli

    fv = flags.FlagValues()
    cli.define_config_flag(fv, os.path.join(REPO_ROOT, "configs", "demo.py"), argv,
                           "config file, with big_vision-style :args")
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and provenance go", flag_values=fv)
    flags.DEFINE_bool("allow_config_change", False, "resume a workdir whose run had a different config",
                      flag_values=fv)
    # Multi-process runs (see sharding.initialize_distributed): on TPU VM pod slices and under SLURM none of these
    # is needed; elsewhere give all three (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (multi-process runs)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "how many processes train together (multi-process runs)",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes) (multi-process runs)",
                         flag_values=fv)
    rest = cli.parse_flags(fv, argv, USAGE)
    if isinstance(rest, int):
        return rest
    if not fv.workdir:
        print(f"ettin train: error: --workdir is required; usage: ettin train {USAGE}", file=sys.stderr)
        return 2
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # absl logging (Orbax's) otherwise warns that flags were never parsed
    logging.set_verbosity(logging.WARNING)  # Orbax narrates every save at INFO
    try:
        sharding.initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
        import shlex
        train(fv.config, fv.workdir, allow_config_change=fv.allow_config_change,
              command=shlex.join(["ettin", "train"] + list(argv[1:])))
    except (ConfigError, ValueError, OSError) as e:
        print(f"ettin train: {cli.user_error(e) or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the run stopped (a non-finite loss); an out-of-memory step is the user's to fix
        line = cli.user_error(e)
        print(f"ettin train: {line or e}", file=sys.stderr)
        return 2 if line else 1
    return 0
