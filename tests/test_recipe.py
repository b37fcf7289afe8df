"""The recipe table (recipe.py via configs/ettin.py) for every size x phase against the reference sheet.

Every expected number below is copied from shared/reference/ettin.md section 3 (the official YAMLs), not from
recipe.py: per-size peak LR, weight decay, LR warmup and batch-size warmup; per-phase token budget (the 1b's own),
context, schedule and MLM rate; batch 4608, seed 21; the phase-2/3 RoPE thetas, including the phase-3 decoders' local
10k (`model_overrides`). The LR schedule is checked by value, from the optimizer the trainer builds.
"""
import importlib.util
import os

import pytest

from ettin_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ("17m", "32m", "68m", "150m", "400m", "1b")
PHASES = ("pretrain", "extension", "decay", "cross")

# Reference section 3: "Per size (17m, 32m, 68m, 150m, 400m, 1b)".
PEAK_LR = dict(zip(SIZES, (3e-3, 3e-3, 3e-3, 8e-4, 5e-4, 5e-4)))
WEIGHT_DECAY = dict(zip(SIZES, (3e-4, 3e-4, 3e-4, 1e-5, 1e-5, 5e-5)))
LR_WARMUP = dict(zip(SIZES, (4e9, 4e9, 3e9, 3e9, 2e9, 2e9)))
BATCH_SIZE_WARMUP = dict(zip(SIZES, (125e9, 100e9, 75e9, 50e9, 10e9, 3e9)))  # phase 1 only
# The phase table: tokens (the 1b's in brackets there), context, MLM rate.
TOKENS = {"pretrain": (1.7e12, 1.7e12), "extension": (250e9, 83.3e9), "decay": (50e9, 16.7e9),
          "cross": (50e9, 16.7e9)}  # (other sizes, 1b)
CONTEXT = {"pretrain": 1024, "extension": 7999, "decay": 7999, "cross": 7999}
MLM_RATE = {"pretrain": 0.30, "extension": 0.30, "decay": 0.15, "cross": 0.15}
CROSS_WARMUP, CROSS_DECAY = (3e9, 1e9), (10e9, 3.3e9)  # (other sizes, 1b)
INIT = {"pretrain": "none", "extension": "full", "decay": "full", "cross": "weights"}


def _ettin_config(arg):
    spec = importlib.util.spec_from_file_location("ettin_config", os.path.join(REPO, "configs", "ettin.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _expected_lr(size, phase, t, total):
    """The reference's schedule at t non-pad tokens into the phase."""
    peak = PEAK_LR[size]
    if phase == "pretrain":  # linear warmup from 0, then constant at peak
        return peak * min(1.0, t / LR_WARMUP[size])
    if phase == "extension":  # peak * (a + (1 - a)(1 - sqrt(t/T))), a = 0.5
        return peak * (0.5 + 0.5 * (1 - (t / total) ** 0.5))
    if phase == "decay":  # 1 - sqrt from 0.5 x peak down to 0.02 x peak
        return peak * (0.02 + (0.5 - 0.02) * (1 - (t / total) ** 0.5))
    warmup, decay = (CROSS_WARMUP[1], CROSS_DECAY[1]) if size == "1b" else (CROSS_WARMUP[0], CROSS_DECAY[0])
    if t < warmup:  # cross: warmup, constant, linear decay over the last `decay` tokens to 0.02 x peak
        return peak * t / warmup
    return peak * (1 - (1 - 0.02) * max(0.0, (t - (total - decay)) / decay))


def _expected_thetas(size, phase, arch):
    """(global, local) RoPE theta: 10k in phase 1; 160k/160k after, but local 10k for the 17m in phase 2 and for the
    phase-3 decoders of 17m/32m/68m/400m; cross-objective 160k/160k."""
    if phase == "pretrain":
        return 10_000.0, 10_000.0
    local = 160_000.0
    if (phase == "extension" and size == "17m") or (
            phase == "decay" and arch == "decoder" and size in ("17m", "32m", "68m", "400m")):
        local = 10_000.0
    return 160_000.0, local


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("size", SIZES)
def test_recipe_matches_the_reference_sheet(size, phase):
    c = _ettin_config(f"size={size},objective=paired,phase={phase}")
    one_b = size == "1b"
    assert c.seed == 21 and c.global_batch_size == 4608
    assert c.optimizer.peak_lr == PEAK_LR[size] and c.optimizer.weight_decay == WEIGHT_DECAY[size]
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.eps) == (0.9, 0.98, 1e-6)
    assert c.total_tokens == TOKENS[phase][one_b]
    # The context: the document max length is the row length today (seq_len); the long phases' 7999.
    assert c.seq_len == CONTEXT[phase]
    assert c.mlm_rate == MLM_RATE[phase]
    assert c.batch_size_warmup.tokens == (BATCH_SIZE_WARMUP[size] if phase == "pretrain" else 0.0)
    assert c.init_mode == INIT[phase]
    assert c.checkpoint_every_tokens == 8.5e9
    assert c.model.vocab_size == 50368
    # The LR schedule, by value, as the trainer builds it.
    _, schedule = train.make_optimizer(c)
    total = c.total_tokens
    points = [0.0, 0.25e9, 1e9, 2.5e9, 5e9, 0.25 * total, 0.5 * total, total - 5e9, total - 1e9, total]
    for t in points:
        assert float(schedule(t)) == pytest.approx(_expected_lr(size, phase, t, total), rel=1e-5, abs=1e-12), t
    # RoPE thetas of each architecture, with the phase's per-architecture overrides applied.
    models = train.model_configs(c)
    assert set(models) == {"encoder", "decoder"}
    for arch, m in models.items():
        assert (m.global_rope_theta, m.local_rope_theta) == _expected_thetas(size, phase, arch), arch
        assert m.max_position_embeddings >= c.seq_len
