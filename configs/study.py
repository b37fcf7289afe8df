"""The miniature Ettin study's pretraining (issue 26): the demo pair's shape, trained well past the unigram plateau.

    bash experiments/study.sh                 # the whole study: pretrain, cross-objective, evaluate, report
    bash experiments/study.sh --smoke         # the same pipeline on tiny budgets (a few minutes): plumbing only

which runs (with RUNS=runs/study)

    ettin train --config=configs/study.py:corpus=RUNS/corpus --workdir=RUNS/pair
    ettin train --config=configs/study.py:corpus=RUNS/corpus,phase=cross --workdir=RUNS/cross \\
        --config.init_from=RUNS/pair

Pretraining: an MLM encoder (30% masking) and a CLM decoder on the very same batches, the same init (seed 21),
4 layers x 128 (configs/demo.py's shape, 1.73M parameters each), 16 x 256 tokens per step, 15M non-pad training
tokens per model (the issue's floor), warmup-stable-decay at peak LR 3e-3. Cross-objective: each model continues
from the other's weights (encoder by MLM at 15%, decoder by CLM, fresh optimizers) for 3M tokens, 20% of the
pretraining budget (Ettin's cross phase is 3% of its pretraining; a model this short-trained needs more to adapt).

`corpus=DIR`: the folder holding the study's Austen file (DIR/austen.jsonl: the bundled one without the chapters of
data/eval/study/austen_heldout.txt, written by `experiments/study.py prepare`), so the Austen test items are held out
of pretraining. `smoke`: 20 pretraining and 10 cross steps. `dtype=auto` (default): bfloat16 products where the CPU
has AVX512-BF16 or AMX (flags avx512_bf16 / amx_bf16 in /proc/cpuinfo), float32 otherwise; `dtype=float32` forces.

Cost: 15M tokens at the ~3.7k tokens/s measured on the project's 2 cores is ~68 min (~42 min at 5.9k, ~25 min at
the issue's 10k with AMX); the whole study's cost is in experiments/study.sh's header.
"""
import os

from ettin_jax import recipe

PRETRAIN_TOKENS = 15e6
CROSS_TOKENS = 3e6
SMOKE_STEPS = dict(pretrain=20, cross=10)


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); False where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
