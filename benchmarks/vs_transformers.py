"""Ours against transformers' ModernBERT on the same CPU, same shapes, alternating in one process.

    python benchmarks/vs_transformers.py [--rounds=5] [--steps=3] [--only=mlm_8x1024,...] [--out=benchmarks/RESULTS.md]

Workloads (random-initialised models of the same dimensions, fp32 unless named _bf16, no dropout,
torch.set_num_threads(2), transformers with attn_implementation="sdpa" and, for MLM, sparse_prediction=True with
labels -100 at unmasked positions):

    mlm_8x1024       17m encoder train step (forward, backward, optimizer), batch 8 x 1024, 30% masked
    clm_8x1024       17m decoder train step, batch 8 x 1024
    mlm_1x8192       17m encoder train step, batch 1 x 8192
    fwd_150m_32x512  150m encoder forward, no head, batch 32 x 512 (inference)
    gen_150m         150m decoder, greedy, 256 new tokens after a 64-token prompt, batch 1
    *_bf16           mlm_8x1024, clm_8x1024 and fwd_150m_32x512 in mixed precision (bf16 compute, fp32 parameters
                     and optimizer state; theirs under torch.autocast("cpu", torch.bfloat16))

Ours: the jitted `train.make_train_step` (StableAdamW) with donated state, called directly (ettin_jax.bench);
theirs: model(**inputs).loss.backward(); torch.optim.AdamW.step(); zero_grad. Each round times `--steps` calls of
ours then `--steps` of theirs; medians over all rounds; the ratio is ours over theirs in tokens/s. Peak memory is
each side's peak RSS (VmHWM) in a fresh subprocess per workload that builds, compiles and runs 2 steps.
MFU counts the FLOPs the model needs (ettin_jax.flops: sliding windows as windows, sparse MLM head) for both
sides, against the best fp32 matmul rate measured during the run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

WORKLOADS = {
    # name: (kind, size, objective, batch, seq_len, target ratio (None: no target), what, compute dtype)
    "mlm_8x1024": ("train", "17m", "mlm", 8, 1024, 1.4, "train step, 17m MLM, 8 x 1024", "float32"),
    "clm_8x1024": ("train", "17m", "clm", 8, 1024, 1.4, "train step, 17m CLM, 8 x 1024", "float32"),
    "mlm_1x8192": ("train", "17m", "mlm", 1, 8192, 1.8, "train step, 17m MLM, 1 x 8192", "float32"),
    "fwd_150m_32x512": ("forward", "150m", "mlm", 32, 512, 1.3, "encoder forward (no head), 150m, 32 x 512",
                        "float32"),
    "gen_150m": ("generate", "150m", "clm", 1, 64, 1.5, "greedy generation, 150m decoder, 64 + 256 tokens", "float32"),
    # Mixed precision, as Ettin trained: bf16 compute, fp32 parameters and optimizer state. Theirs under
    # torch.autocast("cpu", torch.bfloat16). No target in the issue; reported beside the fp32 rows.
    "mlm_8x1024_bf16": ("train", "17m", "mlm", 8, 1024, None, "train step, 17m MLM, 8 x 1024, bf16", "bfloat16"),
    "clm_8x1024_bf16": ("train", "17m", "clm", 8, 1024, None, "train step, 17m CLM, 8 x 1024, bf16", "bfloat16"),
    "fwd_150m_32x512_bf16": ("forward", "150m", "mlm", 32, 512, None,
                             "encoder forward (no head), 150m, 32 x 512, bf16", "bfloat16"),
}
NEW_TOKENS = 256
MLM_RATE = 0.3
CE_CHUNK = 512  # rows of logits per chunk of our cross-entropy (recipe default 4096: the same speed, 8x the memory)


# --------------------------------------------------------------------------------------------------- ours


def ours(name):
    """(step callable, tokens per call, FLOPs per call) for our side of a workload."""
    import jax
    import jax.numpy as jnp
    from ettin_jax import attention, bench, flops, inference, recipe, sizes
    kind, size, objective, b, t, _, _, dtype = WORKLOADS[name]
    if kind == "train":
        c = recipe.ettin(size=size, objective=objective, phase="pretrain")
        c.global_batch_size, c.seq_len, c.total_steps, c.mlm_rate = b, t, 1000, MLM_RATE
        c.model.update(dtype=dtype, attention_dropout=0.0)
        c.batch_size_warmup.tokens = 0.0
        c.ce_chunk = CE_CHUNK
        tb = bench.TrainBench(c)
        return tb.step, tb.tokens, tb.flops
    cfg = sizes.model_config(size, dtype=dtype)
    if kind == "forward":
        fb = bench.ForwardBench(cfg, attention.BIDIRECTIONAL, b, t)
        return fb.step, fb.tokens, fb.flops
    params = jax.jit(lambda k: __import__("ettin_jax.model", fromlist=["x"]).init_params(cfg, k))(jax.random.key(0))
    prompt = [cfg.cls_token_id] + list(range(1000, 1000 + t - 1))
    step = lambda: inference.generate(params, cfg, prompt, NEW_TOKENS, eos_id=None)
    f = sum(flops.forward_flops_per_token(cfg, t + i, causal=True) + flops.head_flops(cfg) / 2
            for i in range(NEW_TOKENS))  # decoding: one token at a time, over a growing context
    return step, float(NEW_TOKENS), f


# ------------------------------------------------------------------------------------------------ theirs


def theirs(name):
    """(step callable, tokens per call, FLOPs per call) for transformers' side of a workload."""
    import numpy as np
    import torch
    import transformers
    from ettin_jax import bench, hf, sizes
    torch.set_num_threads(2)
    torch.manual_seed(0)
    kind, size, objective, b, t, _, _, dtype = WORKLOADS[name]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    cfg = sizes.model_config(size, attention_dropout=0.0)
    arch = "decoder" if objective == "clm" else "encoder"
    d = hf.hf_config(cfg, arch)
    d.pop("architectures")
    d.pop("model_type")
    if arch == "encoder":
        d["sparse_prediction"] = True
        hcfg = transformers.ModernBertConfig(**d)
        hcfg._attn_implementation = "sdpa"
        model = transformers.ModernBertForMaskedLM(hcfg)
    else:
        hcfg = transformers.ModernBertDecoderConfig(**d)
        hcfg._attn_implementation = "sdpa"
        model = transformers.ModernBertDecoderForCausalLM(hcfg)
    host = bench.synthetic_batch(cfg, b, t, mlm_rate=MLM_RATE if objective == "mlm" else 0.0)
    if kind == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=3e-4)
        if objective == "mlm":
            inputs = torch.from_numpy(host["mlm_inputs"]).long()
            labels = np.full(host["tokens"].shape, -100, np.int64)
            for i in range(b):
                k = host["mlm_weights"][i] > 0
                labels[i, host["mlm_positions"][i][k]] = host["mlm_labels"][i][k]
            labels = torch.from_numpy(labels)
        else:
            inputs = torch.from_numpy(host["tokens"]).long()
            labels = inputs
        mask = torch.ones_like(inputs)

        def step():
            with autocast():
                loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        from ettin_jax import flops
        preds = float(host["mlm_weights"].sum()) if objective == "mlm" else float(b * (t - 1))
        f = flops.train_flops(cfg, tokens=float(b * t), predictions=preds, seq_len=t, causal=objective == "clm")
        return step, float(b * t), f
    model.eval()
    from ettin_jax import flops
    if kind == "forward":
        inputs = torch.from_numpy(host["tokens"]).long()
        mask = torch.ones_like(inputs)

        def step():
            with torch.inference_mode(), autocast():
                return model.model(input_ids=inputs, attention_mask=mask).last_hidden_state
        return step, float(b * t), b * t * flops.forward_flops_per_token(cfg, t, causal=False)
    prompt = torch.tensor([[cfg.cls_token_id] + list(range(1000, 1000 + t - 1))])

    def step():
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=cfg.pad_token_id)
    f = sum(flops.forward_flops_per_token(cfg, t + i, causal=True) + flops.head_flops(cfg) / 2
            for i in range(NEW_TOKENS))
    return step, float(NEW_TOKENS), f


# ------------------------------------------------------------------------------------------------ timing


def _block(x):
    try:
        import jax
        jax.block_until_ready(x)
    except Exception:
        pass
    return x


def timed(step, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        _block(step())
        out.append(time.perf_counter() - t0)
    return out


def memory_child(side, name):
    """Runs in a fresh subprocess: build, compile, 2 steps; prints the peak RSS."""
    step, _, _ = (ours if side == "ours" else theirs)(name)
    for _ in range(2):
        _block(step())
    print(json.dumps(dict(peak_rss_bytes=_vm_hwm())))


def _vm_hwm():
    """This process's peak RSS: VmHWM of its own address space. (ru_maxrss is not used: on Linux a child started
    from a large parent reports the parent's high-water mark.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(side, name, heap):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_memory={side}:{name}", f"--heap={heap}"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"memory subprocess {side}:{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def matmul_rate():
    from ettin_jax import flops
    flops.measured_matmul_peak.cache_clear()
    return flops.measured_matmul_peak()


def run_workload(name, rounds, steps, log):
    sides = {}
    for side, build in (("ours", ours), ("transformers", theirs)):
        t0 = time.perf_counter()
        step, tokens, f = build(name)
        for _ in range(2):  # compile / warm up
            _block(step())
        sides[side] = dict(step=step, tokens=tokens, flops=f, times=[], setup_s=time.perf_counter() - t0)
    for r in range(rounds):
        for side in ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours"):
            sides[side]["times"] += timed(sides[side]["step"], steps)
        log(f"  {name} round {r + 1}/{rounds}: ours {statistics.median(sides['ours']['times']):.3f} s, "
            f"transformers {statistics.median(sides['transformers']['times']):.3f} s")
    out = {}
    for side, s in sides.items():
        med = statistics.median(s["times"])
        out[side] = dict(step_time_s=med, tokens_per_s=s["tokens"] / med, flops_per_step=s["flops"],
                         times_s=[round(x, 4) for x in s["times"]])
    out["ratio"] = out["ours"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    return out


def write_results(path, results, peak, argv, loads, kept):
    lines = ["# Ours vs transformers' ModernBERT on this CPU", "",
             "Reproduce (from the repository root, on a quiet machine; 16-19 minutes on the 2-core machine):", "",
             f"    python benchmarks/vs_transformers.py {' '.join(argv)}".rstrip(), "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"load average at start / end {loads[0]} / {loads[1]}. Measured fp32 matmul peak (best during the "
             f"run): {peak / 1e9:.0f} GFLOP/s. Versions: {_versions()}.", "",
             "Both sides: fp32 (rows marked bf16: bf16 compute with fp32 parameters and optimizer state, theirs "
             "under torch.autocast(\"cpu\", torch.bfloat16)), random-initialised, same dimensions, no dropout; "
             "transformers with sdpa attention, "
             "sparse prediction for MLM, torch.set_num_threads(2), its own AdamW step inside the timed train step "
             "(ours: StableAdamW inside the jitted step). Each round times both sides back to back, alternating "
             "which goes first; the figures are medians over all rounds, the ratio is ours / transformers. Host "
             "allocator, shared by both sides: " + ("glibc keeps freed memory (`ettin_jax.kernels.cpu.hostmem`: one arena, no "
             "mmap'd blocks, no trimming; what the `ettin` command sets)" if kept else "glibc's defaults") + ".", "",
             "| workload | ours tok/s | transformers tok/s | ratio | target | met | ours MFU | transformers MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        target, bf16 = WORKLOADS[name][5], WORKLOADS[name][7] == "bfloat16"
        o, t = r["ours"], r["transformers"]
        # bf16 rows: no MFU (their products run on the bf16 units, whose peak this script does not measure)
        mfu = lambda s: "n/a" if bf16 else f"{s['flops_per_step'] / s['step_time_s'] / peak:.0%}"
        met = "-" if target is None else ("yes" if r["ratio"] >= target else "NO")
        lines.append(f"| {WORKLOADS[name][6]} | {o['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.2f}x | {'-' if target is None else f'{target}x'} | {met} | "
                     f"{mfu(o)} | {mfu(t)} |")
    mem = {n: r for n, r in results.items() if "memory" in r}
    if mem:
        lines += ["", "Peak memory: each side's peak resident set size (VmHWM) in a fresh subprocess that builds "
                  "the model, compiles and runs two steps (ours also: XLA's compiled memory analysis is in "
                  "`ettin bench`).", "", "| workload | ours peak RSS | transformers peak RSS | ours / theirs |",
                  "|---|---|---|---|"]
        for name, r in mem.items():
            o, t = r["memory"]["ours"], r["memory"]["transformers"]
            lines.append(f"| {WORKLOADS[name][6]} | {o / 2**30:.2f} GiB | {t / 2**30:.2f} GiB | {o / t:.2f} |")
    lines += ["", "MFU: the FLOPs the model needs (`ettin_jax.flops`: sliding windows count their window, MLM counts "
              "only masked positions through the head; the same count for both sides) per second over the measured "
              "matmul peak. Step times (s) per side are in RESULTS.json.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _versions():
    import jax
    import torch
    import transformers
    return f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed calls per side per round")
    p.add_argument("--only", default="", help="comma-separated workloads (default: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    p.add_argument("--heap", choices=("keep", "default"), default="default",
                   help="default: glibc's own settings (as the issue's transformers figures were measured); keep: "
                        "glibc keeps freed memory (ettin_jax.kernels.cpu.hostmem, what the `ettin` command sets), for both sides, "
                        "which share the process")
    p.add_argument("--_memory", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    from ettin_jax.kernels.cpu import hostmem
    kept = a.heap == "keep" and hostmem.keep_freed_memory()  # before jax or torch start threads
    if a._memory:
        side, name = a._memory.split(":")
        return memory_child(side, name)
    names = [n for n in a.only.split(",") if n] or list(WORKLOADS)
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; expected some of {', '.join(WORKLOADS)}")
    log = lambda s: print(s, flush=True)
    loads = [os.getloadavg()[0]]
    peak = matmul_rate()
    results = {}
    for name in names:
        log(f"{name}: {WORKLOADS[name][6]}")
        results[name] = run_workload(name, a.rounds, a.steps, log)
        peak = max(peak, matmul_rate())
        if WORKLOADS[name][0] == "train" and not a.no_memory:
            results[name]["memory"] = {side: peak_rss(side, name, a.heap) for side in ("ours", "transformers")}
        log(f"  ratio {results[name]['ratio']:.2f}x {json.dumps({k: v for k, v in results[name].items() if k == 'memory'})}")
    loads.append(os.getloadavg()[0])
    argv = [x for x in sys.argv[1:] if not x.startswith("--out")]
    write_results(a.out, results, peak, argv, [f"{x:.1f}" for x in loads], kept)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(dict(results=results, peak_flops=peak, loads=loads, heap_kept=kept), f, indent=1)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
