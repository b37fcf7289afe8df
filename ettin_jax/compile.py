"""`ettin compile`: the exact train step of a config, compiled ahead of time for a TPU topology (or this host).

    ettin compile --config=configs/ettin.py:size=150m,objective=mlm,phase=pretrain --topology=v5e:2x2 [--json]

The step is the one `ettin train` runs (`train.jit_train_step`: the same function, shardings, donation,
micro-batching and remat), lowered with abstract state and batch (`jax.ShapeDtypeStruct` with shardings) on a mesh
built from compile-only TPU devices (`jax.experimental.topologies`, the libtpu wheel; no TPU needed, as MaxText's
`train_compile.py` does), and compiled by the TPU compiler. Its `memory_analysis()` gives the per-chip figures:
arguments, outputs, temporaries and the peak, against the chip's HBM. The kernels are chosen for the mesh's devices
(`kernels.platform`), so the program is the TPU program: splash attention as Mosaic kernels, no CPU custom calls.

The model FLOPs per step come from the written-down formula (`flops.train_flops`): the compiler's `cost_analysis()`
leaves out the Mosaic kernels. A step that does not fit is one line naming the compiler's figure and the knobs
(micro_batch_size, remat, mesh), exit status 2.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp

# One libtpu per process by default; a test suite or two terminals may compile at once. The worker hostname keeps
# libtpu from printing an error line about a TPU VM environment this host does not have.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

GiB = 2 ** 30
# HBM per chip the compiler may use (its RESOURCE_EXHAUSTED message names the same figure for a v5e: 15.75G).
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": int(15.75 * GiB), "TPU v5": 95 * GiB, "TPU v5p": 95 * GiB,
             "TPU v6 lite": 31.25 * GiB}
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v6e:2x2, v4:2x2x1, v5p:2x2x1, v5p:4x4x4"
MEGACORE = ("v4", "v5p", "v5")  # two TensorCores per chip, one device (MaxText's chip config)


class CompileError(ValueError):
    """A user error: a topology the compiler does not know, or a config the topology cannot hold."""


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only devices of a TPU topology, e.g. 'v5e:2x2' or 'v5p:4x4x4' (chips, not TensorCores)."""
    from jax.experimental import topologies
    m = re.fullmatch(r"(v\d+[a-z]*)[:=_](\d+(?:x\d+)+)", name or "")
    if m is None:
        raise CompileError(f"unknown topology {name!r}: expected GENERATION:AxB[xC], e.g. {TOPOLOGY_EXAMPLES}")
    kw = {}
    if m.group(1) in MEGACORE:
        kw = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), wrap=(False, False, False))
    try:
        topo = topologies.get_topology_desc(name, "tpu", num_slices=num_slices, **kw)
    except Exception as e:  # libtpu's INVALID_ARGUMENT, or no libtpu
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(f"topology {name!r} (num_slices={num_slices}) is not one libtpu builds ({first[:200]}); "
                           f"examples: {TOPOLOGY_EXAMPLES}") from None
    return list(topo.devices)


def hbm_bytes(device) -> Optional[int]:
    """The memory one device has: what the backend reports, else the TPU table, else the host's RAM for CPU."""
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "tpu":
        return HBM_BYTES.get(device.device_kind)
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def memory_figures(compiled) -> dict:
    """Per-device bytes from the compiler: arguments, outputs, aliased (donated) bytes, temporaries and the peak
    (arguments + outputs - aliased + temporaries, as MaxText's train_compile reports it)."""
    m = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    return dict(argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
                peak_bytes=arg + out - alias + temp)


def custom_calls(compiled) -> dict:
    """Custom-call targets in the compiled program and how often each occurs (Mosaic kernels are tpu_custom_call)."""
    counts: dict = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()):
        counts[target] = counts.get(target, 0) + 1
    return counts


KNOBS = ("--config.micro_batch_size (gradient accumulation), --config.model.remat=full|dots, "
         "--config.mesh.fsdp / --config.mesh.tensor (shard the state), --config.global_batch_size")


def lower_train_step(config, devices=None):
    """(lowered step, mesh, model configs): `ettin train`'s step for `config`, traced and lowered on a mesh of
    `devices` (default: this host's) with abstract state and batch; nothing is allocated or run."""
    from ettin_jax import sharding
    from ettin_jax import train as train_lib

    config = train_lib.without_init(config)
    models = train_lib.validate_config(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    for cfg in models.values():
        sharding.validate(cfg, mesh, config.global_batch_size, seq_len=config.seq_len,
                          micro_batch_size=config.micro_batch_size)
    rules = sharding.rules(config)
    tx, schedule = train_lib.make_optimizer(config)
    # Abstract state before entering the mesh: nothing may run eagerly on compile-only devices.
    params, opt_state = train_lib.abstract_state(models, config, mesh, tx, rules)
    batch = train_lib.abstract_batch(config, mesh)
    with jax.set_mesh(mesh), __import__("flax").linen.logical_axis_rules(rules):
        jstep = train_lib.jit_train_step(models, config, tx, schedule, mesh, params, opt_state)
        lowered = jstep.lower(params, opt_state, batch, jax.ShapeDtypeStruct((), jnp.int32),
                              jax.ShapeDtypeStruct((), jnp.float32))
    return lowered, mesh, models


def compile_train_step(config, devices=None) -> dict:
    """Compiles `ettin train`'s step for `config` on `devices` (default: this host's) and returns its figures."""
    from ettin_jax import objectives, recipe

    t0 = time.perf_counter()
    lowered, mesh, models = lower_train_step(config, devices)
    device = mesh.devices.flat[0]
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA reports a program that cannot fit while compiling it (RESOURCE_EXHAUSTED)
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "exceeds available" not in msg:
            raise
        line = next((x for x in msg.splitlines() if "exceeds" in x or "RESOURCE_EXHAUSTED" in x), msg)
        return dict(fits=False, compiler_error=line.strip()[:400], compile_seconds=time.perf_counter() - t0,
                    platform=device.platform, device_kind=device.device_kind, mesh=dict(mesh.shape),
                    hbm_bytes=hbm_bytes(device))
    seconds = time.perf_counter() - t0
    objs = recipe.models_of(config)
    tokens = config.global_batch_size * config.seq_len
    model_flops = 0.0
    for arch, o in objs.items():  # every token real, the expected share of them masked
        model_flops += objectives.get_objective(o).train_flops(models[arch], tokens=tokens,
                                                               masked=tokens * config.mlm_rate, seq_len=config.seq_len)
    calls = custom_calls(compiled)
    figures = memory_figures(compiled)
    hbm = hbm_bytes(device)
    return dict(fits=hbm is None or figures["peak_bytes"] <= hbm, **figures, hbm_bytes=hbm,
                compile_seconds=seconds, platform=device.platform, device_kind=device.device_kind,
                num_devices=mesh.devices.size, mesh={k: v for k, v in mesh.shape.items()},
                model_flops_per_step=model_flops, model_flops_per_device=model_flops / mesh.devices.size,
                mosaic_kernels=calls.get("tpu_custom_call", 0),
                native_cpu_calls=sum(n for t, n in calls.items() if t.startswith("ettin_")),
                custom_calls=calls, global_batch_size=config.global_batch_size, seq_len=config.seq_len,
                micro_batch_size=config.micro_batch_size, remat=config.model.remat)


def refusal(result: dict, what: str) -> str:
    """The one line for a step that does not fit."""
    hbm = result.get("hbm_bytes")
    have = f"{hbm / GiB:.2f} GiB" if hbm else "unknown"
    if "compiler_error" in result:
        figure = f"the compiler refuses it: {result['compiler_error']}"
    else:
        figure = f"peak {result['peak_bytes'] / GiB:.2f} GiB per device (temporaries {result['temp_bytes'] / GiB:.2f})"
    return (f"{what} does not fit on {result['device_kind']} ({have} per device), mesh {result['mesh']}: {figure}; "
            f"turn {KNOBS}")


def describe(result: dict) -> str:
    g = lambda k: f"{result[k] / GiB:.2f}"
    hbm = result.get("hbm_bytes")
    return "\n".join([
        f"compiled for {result['num_devices']} x {result['device_kind']} ({result['platform']}), mesh "
        f"{result['mesh']} in {result['compile_seconds']:.1f} s",
        f"per device: arguments {g('argument_bytes')} GiB, outputs {g('output_bytes')} GiB (donated "
        f"{g('alias_bytes')}), temporaries {g('temp_bytes')} GiB, peak {g('peak_bytes')} GiB of "
        f"{hbm / GiB:.2f} GiB: {'fits' if result['fits'] else 'DOES NOT FIT'}" if hbm else
        f"per device: peak {g('peak_bytes')} GiB (device memory unknown)",
        f"model FLOPs per step {result['model_flops_per_step']:.3e} ({result['model_flops_per_device']:.3e} per "
        f"device); Mosaic kernels {result['mosaic_kernels']}, native CPU calls {result['native_cpu_calls']}",
    ])


USAGE = ("--config=configs/ettin.py:size=SIZE,objective=OBJECTIVE,phase=PHASE --topology=v5e:2x2 "
         "[--num_slices=N] [--json] [--config.x=y ...]")


def main(argv, subcommand=None) -> int:
    from absl import flags

    from ettin_jax import cli
    from ettin_jax.train import REPO_ROOT, ConfigError

    fv = flags.FlagValues()
    cli.define_config_flag(fv, os.path.join(REPO_ROOT, "configs", "demo.py"), argv,
                           "config file, with big_vision-style :args")
    flags.DEFINE_string("topology", None, f"TPU topology to compile for ({TOPOLOGY_EXAMPLES}); "
                        "empty: this host's devices", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice: set config.mesh.dcn_data)", flag_values=fv)
    flags.DEFINE_bool("json", False, "also print the figures as JSON on the last line", flag_values=fv)
    rest = cli.parse_flags(fv, argv, USAGE)
    if isinstance(rest, int):
        return rest
    try:
        devices = topology_devices(fv.topology, fv.num_slices) if fv.topology else None
        result = compile_train_step(fv.config, devices)
    except (CompileError, ConfigError, ValueError) as e:
        print(f"ettin compile: {e}", file=sys.stderr)
        return 2
    what = f"the {fv.config.size} {fv.config.objective} {fv.config.phase} step"
    if not result["fits"]:
        print(f"ettin compile: {refusal(result, what)}", file=sys.stderr)
        if fv.json:
            print(json.dumps(result))
        return 2
    print(describe(result))
    if fv.json:
        print(json.dumps(result))
    return 0
