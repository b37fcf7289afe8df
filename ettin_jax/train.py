"""`ettin train`: any Ettin phase, any size, MLM or CLM or both at once (paired), resumable.

    ettin train --config=configs/ettin.py:size=150m,objective=mlm,phase=pretrain --workdir=DIR [--config.x=y ...]

The state is `params` and `opt_state`, each a dict keyed by architecture ('encoder' and/or 'decoder'); a paired run
trains both on the very same batch (one data pipeline, two parameter trees, one jitted step). The step is a pure
function (params, opt_state, batch, tokens_seen) -> (params, opt_state, metrics); dropout keys are folded from
(seed, step, architecture), and a step whose loss or gradient is not finite leaves the state untouched, so a NaN can
never reach a checkpoint. The host loop only feeds batches, logs, and saves.
"""
from __future__ import annotations

import dataclasses
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

from ettin_jax import checkpoint as ckpt_lib
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


class ConfigError(ValueError):
    """A config that cannot train; raised before anything is compiled."""


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
    for name, valid in (("size", recipe.SIZE_RECIPE), ("objective", recipe.OBJECTIVES), ("phase", recipe.PHASES)):
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
    n_micro = (config.global_batch_size // config.micro_batch_size) if config.micro_batch_size else 1

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


# ------------------------------------------------------------------------------------------------ state


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
        params, opt_state = load_initial(config, models, params, tx, log, rules)
    if opt_state is None:
        # Explicit out_shardings: the moments must be sharded like the parameters (FSDP), not left replicated.
        opt_sh = sharding.like_params(jax.eval_shape(tx.init, params), params, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return params, opt_state


def load_initial(config, models, fresh_params, tx, log, rules=sharding.DEFAULT_RULES):
    """Phase continuation: weights (+ optimizer for init_mode=full) from `init_from`, onto fresh shardings.

    Each architecture starts from the one `_source_arch` picks. With init_mode=full the optimizer state of exactly
    those architectures continues: a paired run's encoder state feeds an encoder-only extension, say.
    """
    src = config.init_from
    if _is_hf_folder(src):
        from ettin_jax import hf
        if config.init_mode == "full":
            raise ConfigError(f"init_from={src} is a Hugging Face folder, which has no optimizer state; "
                              "use --config.init_mode=weights")
        hf_params, hf_cfg, hf_arch = hf.load_hf_folder(src)
        source, ck = {hf_arch: hf_params}, None
    else:
        ck = ckpt_lib.Checkpoints(src, async_save=False)
        step, restored = ck.restore_latest(log=log)
        if restored is None:
            ck.close()
            raise ConfigError(f"init_from={src}: no readable checkpoint")
        source = restored["params"]
    take = {}
    for arch in models:
        from_arch = _source_arch(config, arch, source)
        if from_arch is None:
            raise ConfigError(f"init_from={src} holds {sorted(source)}; nothing to start the {arch} from")
        mismatch = _first_mismatch(fresh_params[arch], source[from_arch])
        if mismatch:
            raise ConfigError(f"init_from={src}: the {from_arch} does not fit the configured {arch} "
                              f"(size {config.size}): {mismatch}")
        take[arch] = from_arch
    params = {arch: jax.tree_util.tree_map(lambda x, ref: jax.device_put(jnp.asarray(x, ref.dtype), ref.sharding),
                                           source[from_arch], fresh_params[arch])
              for arch, from_arch in take.items()}
    for arch, from_arch in take.items():
        if from_arch != arch:
            log(f"cross-objective: the {arch} starts from the {from_arch}'s weights")
    source_opt = None
    if config.init_mode == "full":
        if not os.path.isdir(os.path.join(ck.directory, str(step), "opt_state")):
            ck.close()
            raise ConfigError(f"init_from={src}: checkpoint {step} has no optimizer state (an import?); "
                              "use --config.init_mode=weights")
        source_opt = _restore_opt_state(ck, step, src, source, fresh_params, tx, rules)
    if ck is not None:
        ck.close()
        log(f"initialising from {src} step {step} ({config.init_mode})")
    return params, source_opt


def _restore_opt_state(ck, step, src, source_params, fresh_params, tx, rules):
    """The optimizer state of this run's architectures from a checkpoint whose run may have trained more of them
    (a paired run): restored whole onto the mesh, each architecture's moments sharded like its parameters, then
    the leaves this run's state has are picked by their tree path (the same path: the same architecture)."""
    mesh = jax.tree_util.tree_leaves(fresh_params)[0].sharding.mesh
    source_models = ckpt_lib.load_models(src)
    abstract = {}
    for arch in source_params:
        if arch in fresh_params:
            abstract[arch] = _abstract(fresh_params[arch])
        else:  # an architecture this run does not train: sharded by the rules, as its own run had it
            shapes, specs = abstract_params(source_models[arch])
            shards = sharding.fit_shardings(sharding.param_shardings(specs, mesh, rules), shapes)
            abstract[arch] = jax.tree_util.tree_map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shards)
    full = jax.eval_shape(tx.init, abstract)
    full = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  full, sharding.like_params(full, abstract, mesh))
    restored = ck.restore(step, opt_state=full)["opt_state"]
    if set(source_params) == set(fresh_params):
        return restored
    by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    target = jax.eval_shape(tx.init, fresh_params)
    return jax.tree_util.tree_map_with_path(lambda p, _: by_path[jax.tree_util.keystr(p)], target)


def _first_mismatch(expected, got) -> Optional[str]:
    """The first parameter whose shape differs (or a note that the trees differ), None when they fit."""
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(got):
        return "the parameter trees differ (other layers or names)"
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree_util.tree_leaves(got)):
        if tuple(a.shape) != tuple(b.shape):
            return f"{jax.tree_util.keystr(path)} has shape {tuple(b.shape)}, expected {tuple(a.shape)}"
    return None


def _source_arch(config, arch: str, available) -> Optional[str]:
    """Which architecture of a previous run `arch` starts from: the other one in a cross-objective run (the same
    one as a fallback); the same one in a phase continuation (the other one as a fallback for init_mode=weights)."""
    if config.phase == "cross":
        order = (recipe.cross_source(arch), arch)
    elif config.init_mode == "full":  # the optimizer state belongs to the architecture it was trained with
        order = (arch,)
    else:
        order = (arch, recipe.cross_source(arch))
    return next((a for a in order if a in available), None)


def _source_models(src: str) -> dict[str, ModelConfig]:
    """{architecture: ModelConfig} of init_from (an ettin workdir or a Hugging Face folder), without the weights."""
    if _is_hf_folder(src):
        from ettin_jax import hf
        with open(os.path.join(src, "config.json")) as f:
            cfg, arch = hf.model_config_from_hf(json.load(f), **hf._tokenizer_special_ids(src))
        return {arch: cfg}
    try:
        return ckpt_lib.load_models(src)
    except FileNotFoundError:
        raise ConfigError(f"init_from={src}: neither an ettin workdir (models.json) nor a Hugging Face folder "
                          "(config.json)") from None


def _is_hf_folder(src: str) -> bool:
    return os.path.exists(os.path.join(src, "config.json")) and not os.path.exists(os.path.join(src, "models.json"))


TOKEN_FIELDS = ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id")


def check_init_source(config, models: dict[str, ModelConfig], tokenizer):
    """Refuses to start from init_from when this run's vocabulary differs from the source model's: its embedding
    rows would mean other tokens (a released Ettin model with the bundled 8192-token BPE, say). Names the fields
    and the tokenizer to use instead. Runs before any data is read or anything is compiled."""
    src = config.init_from
    source = _source_models(src)
    for arch, cfg in models.items():
        from_arch = _source_arch(config, arch, source)
        if from_arch is None:
            hint = (f"; init_mode=full continues the same architecture (with its optimizer state): use "
                    "--config.init_mode=weights or phase=cross to start from the other one"
                    if config.init_mode == "full" and config.phase != "cross" else "")
            raise ConfigError(f"init_from={src} holds {sorted(source)}; nothing to start the {arch} from{hint}")
        theirs = source[from_arch]
        differ = [f for f in TOKEN_FIELDS if getattr(theirs, f) != getattr(cfg, f)]
        if not differ:
            continue
        shown = ", ".join(f"{f} {getattr(theirs, f)} there but {getattr(cfg, f)} here" for f in differ)
        # `ettin import` and every training run keep the tokenizer in WORKDIR/tokenizer; an HF folder holds its own.
        tok_dir = src if _is_hf_folder(src) else os.path.join(src, "tokenizer")
        use = f"--config.data.tokenizer={tok_dir if os.path.isdir(tok_dir) else 'THE_TOKENIZER_IT_WAS_TRAINED_WITH'}"
        if theirs.vocab_size != cfg.vocab_size:
            use += f" --config.model.vocab_size={theirs.vocab_size}"
        raise ConfigError(f"init_from={src}: the {from_arch} there was trained with another vocabulary than this "
                          f"run's {arch} (tokenizer {tokenizer.path}, config.model.vocab_size): {shown}; train with "
                          f"the source's tokenizer and vocabulary size: {use}")


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
        if self.tb:
            self.tb.close()


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


def _row_weights(config, tokens_seen: int, rows: int, shard_index: int) -> Optional[np.ndarray]:
    bw = config.batch_size_warmup
    if not bw.tokens:
        return None
    n = int(optim.batch_size_warmup(float(tokens_seen), start=max(1, bw.start or 1),
                                    end=config.global_batch_size, warmup_tokens=bw.tokens))
    global_rows = shard_index * rows + np.arange(rows)
    return (global_rows < n).astype(np.float32)


def train(config, workdir: str, *, allow_config_change: bool = False, log=print) -> dict:
    """Runs (or resumes) a training run in `workdir`; returns the last logged metrics."""
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
        check_init_source(config, models, tok)
    if jax.process_index() == 0:  # one writer: processes sharing a workdir would race on the temporary files
        ckpt_lib.write_json(workdir, "config.json", config_to_dict(config))
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
        data_iter = pipe.iterator(0)
        if checkpoints.steps():
            # Resume: fresh state only for its shapes and shardings, then everything from the workdir.
            fresh_params, fresh_opt = init_state(models, _no_init(config), mesh, tx, rules, log)
            step, restored = checkpoints.restore_latest(log=log, params=_abstract(fresh_params),
                                                        opt_state=_abstract(fresh_opt))
            if restored is None:
                log("no readable checkpoint; starting from scratch")
            else:
                params, opt_state = restored["params"], restored["opt_state"]
                start_step, tokens_seen = step, int(restored["meta"]["tokens"])
                try:
                    checkpoints.restore(step, params=_abstract(params), data_iter=data_iter)
                except Exception as e:  # e.g. a different host count: replay the stream to this step instead
                    log(f"data iterator state not restored ({str(e).splitlines()[0][:160]}); "
                        f"replaying the data stream to step {step}")
                    data_iter = pipe.iterator(step)
                newest = checkpoints.steps()[-1]
                note = "" if step == newest else f", the newest readable checkpoint (newest on disk: {newest})"
                log(f"resumed from step {step} ({tokens_seen:,} tokens){note}")
                checkpoints.quarantine_after(step, log=log)
        if params is None:
            params, opt_state = init_state(models, config, mesh, tx, rules, log)

        step_fn = make_train_step(models, config, tx, schedule)
        state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, (params, opt_state))
        batch_sh = sharding.batch_sharding(mesh)
        jstep = jax.jit(step_fn, donate_argnums=(0, 1),
                        in_shardings=(*state_shardings, batch_sh, None, None),
                        out_shardings=(*state_shardings, None))

        peak, peak_src = flops_lib.peak_flops_per_device(config.model.dtype)
        n_devices = mesh.devices.size
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
                           mfu=window["flops"] / dt / (peak * n_devices), tokens_seen=tokens_seen)
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
                    batch = next(data_iter)
                    record = batch.pop("provenance", None)
                    batch.pop("step", None)
                    if record is not None:
                        provenance.write(record)
                    rw = _row_weights(config, tokens_seen, batch["tokens"].shape[0], jax.process_index())
                    if rw is not None:
                        batch["row_weights"] = rw
                    local_tokens = int(((batch["segment_ids"] > 0) * (1 if rw is None else rw[:, None])).sum())
                    # Global counts, summed over processes: tokens_seen drives the learning rate, which every process
                    # must pass identically to the step (and equal to a single-process run's).
                    local_preds = float(batch["mlm_weights"].sum()) if "mlm_weights" in batch else 0.0
                    ntok, npreds = sharding.process_sum(local_tokens, local_preds)
                    ntok = int(ntok)
                    nflops = 0.0
                    for arch, o in objs.items():
                        cfg = models[arch]
                        preds = ntok if o == "clm" else npreds
                        nflops += flops_lib.train_flops(cfg, tokens=ntok, predictions=preds, seq_len=config.seq_len,
                                                        causal=o == "clm")
                    gbatch = sharding.host_batch_to_global(batch, mesh)
                    params, opt_state, m = jstep(params, opt_state, gbatch, jnp.int32(step), jnp.float32(tokens_seen))
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
                                         meta=dict(step=step, tokens=tokens_seen, phase=config.phase))
                        # The bad-input counts survive a crash: written with every checkpoint, not only at the end.
                        _write_data_stats(workdir, pipe)
                    if preempt.signal:
                        checkpoints.wait()
                        log(f"{preempt.signal}: saved step {step}; rerun the same command to resume")
                        break
                if pending is not None and not stopped:
                    finish(pending)
        finally:  # an in-flight asynchronous save completes even when the loop raises: it holds a good step
            checkpoints.close()
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


def _no_init(config):
    """The config with phase initialisation switched off (resume restores everything from the workdir)."""
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
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", os.path.join(REPO_ROOT, "configs", "demo.py"),
                                    "config file, with big_vision-style :args", lock_config=True, sys_argv=argv,
                                    flag_values=fv)
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
    from ettin_jax import cli
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
        train(fv.config, fv.workdir, allow_config_change=fv.allow_config_change)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"ettin train: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"ettin train: {e}", file=sys.stderr)
        return 1
    return 0
