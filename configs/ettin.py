"""Ettin's recipe at any size, objective and phase (reference section 3, the official YAMLs).

    ettin train --config=configs/ettin.py:size=150m,objective=mlm,phase=pretrain --workdir=/mnt/BUCKET/ettin-150m-enc

size: 17m 32m 68m 150m 400m 1b (tiny for tests); objective: mlm clm paired (mntp for encoder-from-decoder);
phase: pretrain (1.7T tokens at 1024), extension (250B at 7999, from pretrain: --config.init_from=WORKDIR),
decay (50B at 7999, from extension), cross (50B, weights of the other architecture: --config.init_from=WORKDIR).

Cost: the 150m pretrain is ~470 H100-hours per model in Ettin's PyTorch code (4 x H100 for about 5 days).
Each run ends at its phase's token budget (config.total_tokens, in non-pad tokens, the LR schedule's horizon);
`--config.total_steps=N` stops it earlier without changing the schedule. `runlocal` shrinks any of them to a
CPU-sized run of the same shape, 20 steps' worth of tokens: `...:size=17m,objective=paired,runlocal`.

Sweeps (`get_sweep`; each point is the config plus its overrides, in its own workdir under --workdir_root):

    ettin sweep --config=configs/ettin.py --sweep=size_objective --workdir_root=runs/grid [--parallel=2]
    ettin sweep-report --workdir_root=runs/grid

size_objective: sizes tiny and 17m x objectives mlm (encoder) and clm (decoder), at demo scale: 30 steps of 8 x 256
tokens, the bundled 8192-token BPE's vocabulary, no batch-size warmup; 4 points, 11.5 minutes measured on 2 CPU
cores shared with other jobs (load ~11; the tiny points ~1 minute each, the 17m ones ~4.5), a few on idle ones.
"""
from ettin_jax import recipe
from ettin_jax.sweep import product


def get_config(arg=None):
    args = dict(size="17m", objective="mlm", phase="pretrain")
    runlocal = False
    for part in (arg or "").split(","):
        if not part:
            continue
        if part == "runlocal":
            runlocal = True
            continue
        if "=" not in part:
            raise ValueError(f"config argument {part!r} is not key=value (keys: size, objective, phase, runlocal)")
        k, v = part.split("=", 1)
        if k not in args:
            raise ValueError(f"unknown config argument {k!r}; expected size, objective, phase or runlocal")
        args[k] = v
    c = recipe.ettin(**args)
    if runlocal:
        # The same run, ~20 steps of 8 x 256 tokens: the token budget shrinks and the schedule with it (the cross
        # phase's decay keeps its share of the run; warmups last 2 steps, the recipe's would be under one).
        c.global_batch_size, c.seq_len = 8, min(c.seq_len, 256)
        local_tokens = 20.0 * c.global_batch_size * c.seq_len
        c.schedule.decay_tokens *= local_tokens / c.total_tokens
        c.schedule.warmup_tokens = 2.0 * c.global_batch_size * c.seq_len
        c.schedule.warmup_frac = c.schedule.decay_frac = 0.0
        c.total_tokens = local_tokens
        c.log_every_steps, c.checkpoint_every_steps = 5, 10
        c.model.dtype = "float32"
        c.batch_size_warmup.tokens = 0.0  # the real warmups span billions of tokens
        c.checkpoint_every_tokens = 0.0
    return c


# The demo-scale shape of a sweep point (the recipe's 1.7T-token pretrain is for a TPU pod, not a sweep).
DEMO_SCALE = {"config.total_steps": 30, "config.total_tokens": 0.0, "config.global_batch_size": 8, "config.seq_len": 256,
              "config.model.vocab_size": 8192, "config.model.dtype": "float32",
              "config.batch_size_warmup.tokens": 0.0, "config.schedule.warmup_tokens": 4096.0,
              "config.log_every_steps": 5, "config.checkpoint_every_steps": 10}

SWEEPS = {
    "size_objective": lambda: product(DEMO_SCALE, ("config.size", ["tiny", "17m"]),
                                      ("config.objective", ["mlm", "clm"])),
}


def get_sweep(name):
    """The points (dicts of config overrides) of sweep `name`: one of SWEEPS."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; expected one of {', '.join(SWEEPS)}")
    return SWEEPS[name]()
