"""Ettin's recipe at any size, objective and phase (reference section 3, the official YAMLs).

    ettin train --config=configs/ettin.py:size=150m,objective=mlm,phase=pretrain --workdir=gs://BUCKET/ettin-150m-enc

size: 17m 32m 68m 150m 400m 1b (tiny for tests); objective: mlm clm paired (mntp for encoder-from-decoder);
phase: pretrain (1.7T tokens at 1024), extension (250B at 7999, from pretrain: --config.init_from=WORKDIR),
decay (50B at 7999, from extension), cross (50B, weights of the other architecture: --config.init_from=WORKDIR).

Cost: the 150m pretrain is ~470 H100-hours per model in Ettin's PyTorch code (4 x H100 for about 5 days).
`runlocal` shrinks any of them to a CPU-sized run of the same shape: `...:size=17m,objective=paired,runlocal`.
"""
from ettin_jax import recipe


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
        c.global_batch_size, c.seq_len, c.total_steps = 8, min(c.seq_len, 256), 20
        c.log_every_steps, c.checkpoint_every_steps = 5, 10
        c.model.dtype = "float32"
        c.schedule.warmup_tokens = 2 * 8 * 256
    return c
