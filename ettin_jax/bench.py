"""`ettin bench`: compile, warm up and time the train step and the inference forward of a config.

    ettin bench --config=configs/ettin.py:size=17m,objective=mlm --config.seq_len=1024 \
        --config.global_batch_size=8 --config.model.dtype=float32 [--steps=10] [--json]

Times `train.make_train_step` (forward, backward, StableAdamW update) jitted with donated state, called directly
on one synthetic batch that stays on the device (no data pipeline, no host loop), and the backbone forward
(no head) of every model the config trains. Prints tokens/s, step time (median of `--steps` timed calls after
`--warmup` untimed ones), peak memory and MFU; with --json the last line is one JSON object.

Peak memory is XLA's compiled memory analysis of the jitted step (arguments + outputs + temporaries, less what is
donated), which every backend reports; on CPU the process's peak RSS is given as well. MFU counts the FLOPs the
model needs (`ettin_jax.flops`) against `flops.Peak` (on CPU the measured matmul peak in the model's compute dtype:
fp32, or bf16 products with fp32 accumulation; measured again, or raised, when a run is faster, so never over 100%).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax import attention, flops as flops_lib, objectives, recipe
from ettin_jax.kernels.cpu import hostmem
from ettin_jax.data.masking import num_mlm_slots
from ettin_jax.model import Ettin, ModelConfig, init_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------- inputs


def synthetic_batch(cfg: ModelConfig, batch: int, seq_len: int, *, mlm_rate: float = 0.3, seed: int = 0) -> dict:
    """One packed-free batch of random tokens with MLM slots at `mlm_rate` (every row one full document)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, min(cfg.vocab_size, 50_000), size=(batch, seq_len), dtype=np.int32)
    tokens[:, 0] = cfg.cls_token_id
    out = dict(tokens=tokens, segment_ids=np.ones((batch, seq_len), np.int32),
               positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy())
    p = num_mlm_slots(mlm_rate, seq_len) if mlm_rate > 0 else 1
    k = min(p, int(round(mlm_rate * (seq_len - 1))))
    positions = np.zeros((batch, p), np.int32)
    for i in range(batch):
        positions[i, :k] = np.sort(rng.choice(np.arange(1, seq_len), size=k, replace=False))
    weights = np.zeros((batch, p), np.float32)
    weights[:, :k] = 1.0
    labels = np.take_along_axis(tokens, positions, axis=1) * (weights > 0)
    inputs = tokens.copy()
    np.put_along_axis(inputs, positions[:, :k], cfg.mask_token_id, axis=1)
    out.update(mlm_inputs=inputs, mlm_positions=positions, mlm_labels=labels.astype(np.int32),
               mlm_weights=weights)
    return out


def predictions_per_step(objective: str, batch: dict) -> float:
    """Tokens that go through the head and decoder in one step."""
    real = float(batch["tokens"].size - batch["tokens"].shape[0])  # a row's last token predicts nothing
    masked = float(batch["mlm_weights"].sum()) if "mlm_weights" in batch else 0.0
    return objectives.get_objective(objective).predictions(tokens=real, masked=masked)


# ------------------------------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], object], steps: int, warmup: int = 2) -> list[float]:
    """Wall time of `steps` calls of fn (each blocked on its result) after `warmup` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def compiled_peak_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled executable, less aliased (donated) buffers."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TrainBench:
    """A compiled train step of one config on one synthetic batch, ready to be called repeatedly.

    `step()` runs one step (state donated and replaced); `flops` is what the model needs per step.
    """

    def __init__(self, config, *, seed: int = 0):
        from ettin_jax import train as train_lib  # the real step, StableAdamW included
        self.config = config
        self.models = train_lib.model_configs(config)
        self.objectives = recipe.models_of(config)
        tx, schedule = train_lib.make_optimizer(config)
        step_fn = train_lib.make_train_step(self.models, config, tx, schedule)
        any_cfg = next(iter(self.models.values()))
        masked = any(objectives.get_objective(o).masked_inputs for o in self.objectives.values())
        host = synthetic_batch(any_cfg, config.global_batch_size, config.seq_len,
                               mlm_rate=config.mlm_rate if masked else 0.0, seed=seed)
        self.tokens = float(host["tokens"].size)
        self.flops = sum(flops_lib.train_flops(
            self.models[a], tokens=self.tokens, predictions=predictions_per_step(o, host), seq_len=config.seq_len,
            causal=objectives.get_objective(o).causal) for a, o in self.objectives.items())
        if not masked:
            host = {k: host[k] for k in ("tokens", "segment_ids", "positions")}
        self.batch = jax.device_put(host)
        self.params = {a: jax.jit(init_params, static_argnums=0)(c, jax.random.key(seed + i))
                       for i, (a, c) in enumerate(sorted(self.models.items()))}
        self.opt_state = jax.jit(tx.init)(self.params)
        jitted = jax.jit(step_fn, donate_argnums=(0, 1))
        args = (self.params, self.opt_state, self.batch, jnp.int32(0), jnp.float32(0))
        t0 = time.perf_counter()
        self.compiled = jitted.lower(*args).compile()
        self.compile_s = time.perf_counter() - t0
        self.peak_bytes = compiled_peak_bytes(self.compiled)
        self._i = 0

    def step(self):
        self.params, self.opt_state, m = self.compiled(self.params, self.opt_state, self.batch,
                                                       jnp.int32(self._i), jnp.float32(self._i * self.tokens))
        self._i += 1
        return m["loss"]


class ForwardBench:
    """The compiled backbone forward (no head) of one model on a random batch."""

    def __init__(self, cfg: ModelConfig, mask, batch: int, seq_len: int, *, seed: int = 0, params=None):
        self.cfg, self.mask = cfg, attention.get_mask(mask)
        host = synthetic_batch(cfg, batch, seq_len, mlm_rate=0.0, seed=seed)
        self.tokens_arr = jax.device_put(host["tokens"])
        self.tokens = float(host["tokens"].size)
        self.params = params if params is not None else jax.jit(init_params, static_argnums=0)(
            cfg, jax.random.key(seed))
        model = Ettin(cfg)
        fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, mask=self.mask))
        t0 = time.perf_counter()
        self.compiled = fwd.lower(self.params, self.tokens_arr).compile()
        self.compile_s = time.perf_counter() - t0
        self.peak_bytes = compiled_peak_bytes(self.compiled)
        self.flops = self.tokens * flops_lib.forward_flops_per_token(cfg, seq_len, causal=self.mask.causal)

    def step(self):
        return self.compiled(self.params, self.tokens_arr)


def summarize(times: list[float], *, tokens: float, flops: float, peak: "flops_lib.Peak") -> dict:
    step = statistics.median(times)
    return dict(step_time_s=step, tokens_per_s=tokens / step, mfu=peak.mfu(flops / step),
                step_times_s=[round(t, 5) for t in times])


def run(config, *, steps: int = 10, warmup: int = 2, forward: bool = True, log=print) -> dict:
    """Benchmarks the train step (and the forward of each model) of `config`; returns the figures."""
    n_dev = jax.device_count()
    peak = flops_lib.Peak(config.model.dtype, n_dev)
    out = dict(device=jax.devices()[0].device_kind, devices=n_dev,
               size=config.size, objective=config.objective, batch=config.global_batch_size,
               seq_len=config.seq_len, dtype=config.model.dtype, steps=steps)
    tb = TrainBench(config)
    r = summarize(time_calls(tb.step, steps, warmup), tokens=tb.tokens, flops=tb.flops, peak=peak)
    out["train"] = dict(r, compile_s=tb.compile_s, flops_per_step=tb.flops, peak_bytes=tb.peak_bytes)
    log(f"train   {config.size} {config.objective} {config.global_batch_size}x{config.seq_len} "
        f"{config.model.dtype}: {r['tokens_per_s']:,.0f} tok/s  step {r['step_time_s'] * 1e3:.1f} ms  "
        f"MFU {r['mfu']:.1%}  peak {_fmt_bytes(tb.peak_bytes)} (XLA)  compile {tb.compile_s:.1f} s")
    if forward:
        out["forward"] = {}
        for arch, o in sorted(tb.objectives.items()):
            fb = ForwardBench(tb.models[arch], objectives.get_objective(o).mask, config.global_batch_size,
                              config.seq_len)
            r = summarize(time_calls(fb.step, steps, warmup), tokens=fb.tokens, flops=fb.flops, peak=peak)
            out["forward"][arch] = dict(r, compile_s=fb.compile_s, peak_bytes=fb.peak_bytes)
            log(f"forward {arch}: {r['tokens_per_s']:,.0f} tok/s  step {r['step_time_s'] * 1e3:.1f} ms  "
                f"MFU {r['mfu']:.1%}  peak {_fmt_bytes(fb.peak_bytes)} (XLA)")
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["heap_kept"] = hostmem.applied()  # `ettin bench` sets it (ettin_jax/hostmem.py); a Python caller may not
    out.update(peak_flops=peak.per_device, peak_source=peak.source)  # as it stands after the runs (flops.Peak)
    log(f"peak RSS of this process {_fmt_bytes(out['peak_rss_bytes'])}; MFU against {peak.per_device / 1e9:,.0f} "
        f"GFLOP/s per device ({peak.source})")
    return out


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:,.0f} MiB"


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv, subcommand=None) -> int:
    from absl import flags
    from ettin_jax import cli

    fv = flags.FlagValues()  # private: the other subcommands' flags never clash with these
    cli.define_config_flag(fv, os.path.join(REPO_ROOT, "configs", "ettin.py"), argv,
                           "config file, with big_vision-style :args")
    flags.DEFINE_integer("steps", 10, "timed calls (the median is reported)", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed calls after compilation", flag_values=fv)
    flags.DEFINE_boolean("forward", True, "also time the inference forward (no head)", flag_values=fv)
    flags.DEFINE_boolean("json", False, "print the figures as JSON on the last line", flag_values=fv)
    rest = cli.parse_flags(fv, argv, "--config=configs/ettin.py:size=17m,objective=mlm [--config.seq_len=1024 ...] "
                                     "[--steps=N] [--warmup=N] [--json]")
    if isinstance(rest, int):
        return rest
    if fv.steps < 1 or fv.warmup < 0:
        print(f"ettin bench: --steps={fv.steps} --warmup={fv.warmup}; expected steps >= 1, warmup >= 0",
              file=sys.stderr)
        return 2
    from ettin_jax.train import ConfigError, validate_config
    config = fv.config
    if config.total_steps <= 0:  # benchmarking needs no schedule horizon; give it one so validation passes
        config = config.copy_and_resolve_references()
        config.total_steps = 1
    try:
        validate_config(config)
    except ConfigError as e:
        print(f"ettin bench: {e}", file=sys.stderr)
        return 2
    result = run(config, steps=fv.steps, warmup=fv.warmup, forward=fv.forward,
                 log=(lambda s: print(s, file=sys.stderr)) if fv.json else print)
    if fv.json:
        print(json.dumps(result))
    return 0
