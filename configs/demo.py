"""The embedded default: a small Ettin pair (encoder + decoder on the very same batches) on the bundled corpus.

    ettin train --config=configs/demo.py --workdir=runs/demo

Trains a 4-layer, 128-wide ModernBERT as an MLM encoder and a CLM decoder on 491,520 non-pad tokens (120 steps'
worth of 16 x 256; packed rows are nearly full, so 121 steps) with the bundled 8192-token BPE: about 1.5 minutes on 2
idle CPU cores (~5.9k tokens/s for the pair), the losses falling from ~9.0 to ~6.9 (decoder) and ~7.1 (encoder);
the README's main command (install, train, export, read back) took 1m48s on a fresh clone (2026-11-21). At this scale the models learn little
beyond token frequencies: it is a smoke test of the whole chain.
Overrides: `--config.total_tokens=204800` (a shorter run, the whole schedule), `--config.total_steps=50` (stop at
step 50, the schedule unchanged), `--config.objective=mlm` (encoder only), ...

Sweeps (`get_sweep`; each point is this config plus its overrides, in its own workdir under --workdir_root):

    ettin sweep --config=configs/demo.py --sweep=lr --workdir_root=runs/lr [--parallel=2]
    ettin sweep --config=configs/demo.py --sweep=mask_rate --workdir_root=runs/mask_rate
    ettin sweep-report --workdir_root=runs/lr        # table (markdown, CSV) and a plot per swept value

lr: the pair at peak LR 1e-3 / 3e-3 (the demo's, Ettin's 17m-68m) / 1e-2; 3 demo runs, ~12 minutes on 2 idle CPU
cores (estimated from the demo's 4). mask_rate: the encoder alone at MLM mask rates 15% (BERT's) / 30% (Ettin's,
after ModernBERT) / 40%, the question behind Ettin's choice of 30%; 3 encoder-only demo runs, under 12 minutes.
Append `--config.total_steps=30` (or any `--config.x=y`, applied to every point) for a smoke run of either.
"""
from ettin_jax import recipe
from ettin_jax.sweep import product


def get_config(arg=None):
    c = recipe.ettin(size="tiny", objective="paired", phase="pretrain")
    c.model.update(vocab_size=8192, dtype="float32", attention_dropout=0.0,
                   num_layers=4, hidden_size=128, intermediate_size=256, num_heads=2)
    c.data.special_ids = dict(unk=0, cls=1, sep=2, pad=3, mask=4)
    c.global_batch_size, c.seq_len = 16, 256
    c.total_tokens = float(120 * c.global_batch_size * c.seq_len)  # the budget; the LR decays to its end
    c.optimizer.peak_lr, c.optimizer.weight_decay = 3e-3, 3e-4
    c.schedule.update(name="warmup_stable_decay", warmup_frac=0.1, decay_frac=0.3, final_frac=0.02)
    c.batch_size_warmup.tokens = 0.0
    c.log_every_steps = 10
    c.checkpoint_every_steps = 50
    c.checkpoint_every_tokens = 0.0
    return c


SWEEPS = {
    "lr": lambda: product(("config.optimizer.peak_lr", [1e-3, 3e-3, 1e-2])),
    "mask_rate": lambda: product({"config.objective": "mlm"}, ("config.mlm_rate", [0.15, 0.3, 0.4])),
}


def get_sweep(name):
    """The points (dicts of config overrides) of sweep `name`: one of SWEEPS."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; expected one of {', '.join(SWEEPS)}")
    return SWEEPS[name]()
