"""The miniature Ettin study's pretraining (issue 26): the demo pair's shape, trained well past the unigram plateau.

    bash experiments/study.sh                 # the whole study: pretrain, cross-objective, evaluate, report
    bash experiments/study.sh --smoke         # the same pipeline on tiny budgets (a few minutes): plumbing only

which runs (with RUNS=runs/study)

    ettin train --config=configs/study.py:corpus=RUNS/corpus --workdir=RUNS/pair
    ettin train --config=configs/study.py:corpus=RUNS/corpus,phase=cross --workdir=RUNS/cross \\
        --config.init_from=RUNS/pair

Pretraining: an MLM encoder (30% masking) and a CLM decoder on the very same batches, the same init (seed 21),
4 layers x 128 (configs/demo.py's shape, 1.73M parameters each), 16 x 256 tokens per step, 6M non-pad training
tokens per model, warmup-stable-decay at peak LR 3e-3. Cross-objective: each model continues from the other's
weights (encoder by MLM at 15%, decoder by CLM, fresh optimizers) for 1.2M tokens, 20% of the pretraining budget
(Ettin's cross phase is 3% of its pretraining; a model this short-trained needs more to adapt).

Why 6M and not the issue's 15M: the whole study must fit 60 minutes on 2 CPU cores. Measured on this project's
2-core machine (AMD EPYC, avx512_bf16, no AMX), idle, 2026-12-03, 100 study-shape steps: the pair trains at
~6.5k tokens/s per model in float32 and ~5.4k in bfloat16 (AVX512-BF16 without AMX converts more than it saves).
15M tokens would take ~38 minutes of the 60 before any evaluation; 6M take ~15, and the loss leaves the unigram
plateau after ~1M (the issue's own trial reached ~3.95 for both at 4M).

`corpus=DIR`: the folder holding the study's Austen file (DIR/austen.jsonl: the bundled one without the chapters of
data/eval/study/austen_heldout.txt, written by `experiments/study.py prepare`), so the Austen test items are held out
of pretraining. `smoke`: 20 pretraining and 10 cross steps. `dtype=auto` (default): bfloat16 products where the CPU
has AMX (flag amx_bf16 in /proc/cpuinfo), float32 otherwise (see above for AVX512-BF16 alone); `dtype=bfloat16` or
`dtype=float32` forces.
"""
import os

from ettin_jax import recipe

PRETRAIN_TOKENS = 6e6
CROSS_TOKENS = 1.2e6
SMOKE_STEPS = dict(pretrain=20, cross=10)


def cpu_has_bf16() -> bool:
    """Whether the CPU has AMX bfloat16 tiles (bfloat16 products pay there; with AVX512-BF16 alone they measured
    slower than float32); False where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags


def parse(arg):
    args = dict(corpus="", phase="pretrain", dtype="auto", smoke=False)
    for part in (arg or "").split(","):
        if not part:
            continue
        if part == "smoke":
            args["smoke"] = True
            continue
        k, _, v = part.partition("=")
        if k not in args or not v or k == "smoke":
            raise ValueError(f"config argument {part!r}: expected corpus=DIR, phase=pretrain|cross, "
                             "dtype=auto|bfloat16|float32 or smoke")
        args[k] = v
    if args["phase"] not in ("pretrain", "cross"):
        raise ValueError(f"phase={args['phase']!r}: the study has phases pretrain and cross")
    if args["dtype"] not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"dtype={args['dtype']!r}: expected auto, bfloat16 or float32")
    return args


def get_config(arg=None):
    args = parse(arg)
    c = recipe.ettin(size="tiny", objective="paired", phase="pretrain")
    dtype = args["dtype"] if args["dtype"] != "auto" else ("bfloat16" if cpu_has_bf16() else "float32")
    c.model.update(vocab_size=8192, dtype=dtype, attention_dropout=0.0,
                   num_layers=4, hidden_size=128, intermediate_size=256, num_heads=2)
    c.data.special_ids = dict(unk=0, cls=1, sep=2, pad=3, mask=4)
    if args["corpus"]:
        for source in c.data.sources:
            if source["name"] == "austen":
                source["path"] = os.path.join(args["corpus"], "austen.jsonl")
    c.global_batch_size, c.seq_len = 16, 256
    tokens_per_step = c.global_batch_size * c.seq_len
    c.optimizer.peak_lr, c.optimizer.weight_decay = 3e-3, 3e-4
    c.schedule.update(name="warmup_stable_decay", warmup_frac=0.05, decay_frac=0.2, final_frac=0.02)
    c.batch_size_warmup.tokens = 0.0
    c.log_every_steps = 25
    c.checkpoint_every_steps = 250
    c.checkpoint_every_tokens = 0.0
    c.total_tokens = PRETRAIN_TOKENS
    if args["phase"] == "cross":
        c.phase, c.init_mode, c.mlm_rate = "cross", "weights", 0.15
        c.total_tokens = CROSS_TOKENS
    if args["smoke"]:
        c.total_tokens = float(SMOKE_STEPS[args["phase"]] * tokens_per_step)
        c.schedule.warmup_frac = 0.1
        c.log_every_steps, c.checkpoint_every_steps = 5, 10
    return c
