"""Tests for ettin_jax.optim: StableAdamW against a float64 numpy transcription of the reference, and the schedules.

The numpy versions below are written from the reference text (section 3), not from the module, so that a slip in
the module (bias correction, which v the RMS uses, decay scaled by the LR, the ndim <= 1 skip) shows as a mismatch.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ettin_jax import optim

B1, B2, EPS = 0.9, 0.98, 1e-6
LR, MAX_LR, WD = 1e-2, 2e-2, 0.1  # lr != max_lr and a large wd, so a misplaced decay factor is visible at 1e-6
STEPS = 20
SPIKE_STEP = 12  # gradients jump x50 here: g^2 >> v, so rms > 1 and the per-tensor LR clipping is active


# ---------------------------------------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------------------------------------


def ref_stable_adamw_step(p, g, m, v, t, lr, max_lr, wd, decay, b1=B1, b2=B2, eps=EPS):
    """One reference step for one tensor, float64. Returns new p, m, v and the tensor's rms."""
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    b1_t = (b1**t - b1) / (b1**t - 1)
    b2_t = (b2**t - b2) / (b2**t - 1)
    m = b1_t * m + (1 - b1_t) * g
    v = b2_t * v + (1 - b2_t) * g**2
    rms = np.sqrt(np.mean(g**2 / np.maximum(v, eps**2)))
    lr_t = lr / max(1.0, rms)
    if decay:
        p = p * (1 - (lr_t / max_lr) * wd)
    p = p - lr_t * m / (np.sqrt(v) + eps)
    return p, m, v, rms


def make_params():
    rng = np.random.default_rng(0)
    return {
        "embedding": rng.normal(size=(7, 4)).astype(np.float32),  # ndim 2: decayed (the tied embedding is)
        "mlp": {"wi": rng.normal(size=(4, 3, 2)).astype(np.float32), "bias": rng.normal(size=(3,)).astype(np.float32)},
        "norm_scale": (1.0 + 0.1 * rng.normal(size=(4,))).astype(np.float32),  # ndim 1: not decayed
        "scalar": np.float32(0.5),  # ndim 0: not decayed
    }


def make_grads(params, steps=STEPS):
    rng = np.random.default_rng(1)
    grads = []
    for t in range(1, steps + 1):
        scale = 50.0 if t == SPIKE_STEP else 1.0
        grads.append(jax.tree.map(lambda p: (scale * rng.normal(size=np.shape(p))).astype(np.float32), params))
    return grads


def run_reference(params, grads, lrs, max_lr=MAX_LR, wd=WD):
    """Reference trajectory; returns the params after each step and the per-tensor rms of each step."""
    leaves, treedef = jax.tree.flatten(params)
    p = [np.asarray(x, np.float64) for x in leaves]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    history, rms_history = [], []
    for t, (g_tree, lr) in enumerate(zip(grads, lrs), start=1):
        g = jax.tree.leaves(g_tree)
        rms = []
        for i in range(len(p)):
            p[i], m[i], v[i], r = ref_stable_adamw_step(p[i], g[i], m[i], v[i], t, lr, max_lr, wd, decay=p[i].ndim > 1)
            rms.append(r)
        history.append(treedef.unflatten([x.copy() for x in p]))
        rms_history.append(treedef.unflatten(rms))
    return history, rms_history


def assert_tree_close(actual, expected, atol=1e-6, rtol=1e-6):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64), e, atol=atol, rtol=rtol),
                 actual, expected)


# ---------------------------------------------------------------------------------------------------------------------
# StableAdamW
# ---------------------------------------------------------------------------------------------------------------------


def test_reference_trajectory_exercises_clipping_and_decay():
    # Guards the test data itself: the comparison below is only meaningful if the clip fires and decay is visible.
    params = make_params()
    _, rms_history = run_reference(params, make_grads(params), [LR] * STEPS)
    spike = jax.tree.leaves(rms_history[SPIKE_STEP - 1])
    assert all(r > 1.5 for r in spike), spike
    # ...and the unclipped branch is exercised too.
    assert min(min(jax.tree.leaves(r)) for r in rms_history) < 0.9


def test_stable_adamw_matches_reference():
    params = make_params()
    grads = make_grads(params)
    tx = optim.stable_adamw(LR, max_learning_rate=MAX_LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    expected, expected_rms = run_reference(params, grads, [LR] * STEPS)

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p, state = params, tx.init(params)
    for i, g in enumerate(grads):
        p, state = step(p, state, g)
        assert_tree_close(p, expected[i])
        assert_tree_close(optim.update_rms(state), expected_rms[i], atol=1e-5, rtol=1e-5)
    assert int(state.count) == STEPS


def test_learning_rate_schedule_of_count():
    # optax convention: the schedule sees the number of updates already applied (0 on the first).
    params = make_params()
    grads = make_grads(params)
    sched = optax.linear_schedule(1e-3, 2e-2, transition_steps=STEPS)
    tx = optim.stable_adamw(sched, max_learning_rate=MAX_LR, weight_decay=WD)
    expected, _ = run_reference(params, grads, [float(sched(i)) for i in range(STEPS)])

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p, state = params, tx.init(params)
    for g in grads:
        p, state = step(p, state, g)
    assert_tree_close(p, expected[-1])


def _token_schedule_run(make_tx, set_lr):
    """Drives an inject_hyperparams optimizer from a token-count schedule inside jit; returns params and expected."""
    params = make_params()
    grads = make_grads(params)
    tokens_per_step = 1000.0
    schedule = optim.warmup_constant(MAX_LR, warmup_tokens=8 * tokens_per_step)
    tx = make_tx()

    @jax.jit
    def step(p, s, g, tokens_seen):
        s = set_lr(s, schedule(tokens_seen))
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p, state = params, tx.init(params)
    lrs = []
    for i, g in enumerate(grads):
        tokens_seen = i * tokens_per_step
        lrs.append(MAX_LR * min(1.0, tokens_seen / (8 * tokens_per_step)))
        p, state = step(p, state, g, jnp.float32(tokens_seen))
    expected, expected_rms = run_reference(params, grads, lrs)
    return p, state, expected[-1], expected_rms[-1]


def test_inject_hyperparams_lr_from_tokens():
    # The path the brief recommends: optax.inject_hyperparams directly, LR written into the hyperparams dict.
    def make_tx():
        return optax.inject_hyperparams(optim.stable_adamw, static_args=("weight_decay_mask",),
                                        hyperparam_dtype=jnp.float32)(
            learning_rate=0.0, max_learning_rate=MAX_LR, weight_decay=WD, weight_decay_mask=optim.decay_mask)

    def set_lr(state, lr):
        state.hyperparams["learning_rate"] = lr
        return state

    p, state, expected, expected_rms = _token_schedule_run(make_tx, set_lr)
    assert_tree_close(p, expected)
    assert_tree_close(optim.update_rms(state), expected_rms, atol=1e-5, rtol=1e-5)


def test_injectable_stable_adamw_and_set_learning_rate():
    make_tx = lambda: optim.injectable_stable_adamw(max_learning_rate=MAX_LR, weight_decay=WD)
    p, state, expected, _ = _token_schedule_run(make_tx, optim.set_learning_rate)
    assert_tree_close(p, expected)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32
    assert state.hyperparams["b2"].dtype == jnp.float32


def test_set_learning_rate_is_pure_and_checks_its_input():
    tx = optim.injectable_stable_adamw(max_learning_rate=MAX_LR)
    state = tx.init(make_params())
    new = optim.set_learning_rate(state, 3e-3)
    assert float(state.hyperparams["learning_rate"]) == 0.0
    assert float(new.hyperparams["learning_rate"]) == pytest.approx(3e-3)
    bare = optim.stable_adamw(1e-3, max_learning_rate=MAX_LR).init(make_params())
    with pytest.raises(ValueError, match="inject_hyperparams"):
        optim.set_learning_rate(bare, 1e-3)


def test_weight_decay_mask_default_explicit_and_callable():
    params = make_params()
    mask = optim.decay_mask(params)
    assert mask == {"embedding": True, "mlp": {"wi": True, "bias": False}, "norm_scale": False, "scalar": False}
    grads = jax.tree.map(jnp.zeros_like, params)  # zero grads: the whole update is the decay
    everything = jax.tree.map(lambda _: True, params)
    for m, decayed in ((None, mask), (everything, everything), (lambda ps: everything, everything)):
        tx = optim.stable_adamw(LR, max_learning_rate=MAX_LR, weight_decay=WD, weight_decay_mask=m)
        updates, _ = tx.update(grads, tx.init(params), params)
        # rms is 0 with zero grads, so lr_t = lr and the decay is (lr / max_lr) * wd * p.
        expected = jax.tree.map(lambda p, d: -(LR / MAX_LR) * WD * np.asarray(p) * d, params, decayed)
        assert_tree_close(updates, expected)


def test_state_is_fp32_for_bf16_params():
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), make_params())
    tx = optim.stable_adamw(LR, max_learning_rate=MAX_LR, weight_decay=WD)
    init_state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), init_state, params)
    # Init as well as update: a state whose dtype changes after the first step breaks jit and scan carries.
    for tree in (init_state.mu, init_state.nu, init_state.rms, state.mu, state.nu, state.rms):
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}


def test_update_rms_found_through_wrappers():
    params = make_params()
    grads = make_grads(params, steps=1)[0]
    for tx in (optim.stable_adamw(LR, max_learning_rate=MAX_LR),
               optim.injectable_stable_adamw(max_learning_rate=MAX_LR),
               optax.chain(optax.identity(), optim.stable_adamw(LR, max_learning_rate=MAX_LR))):
        _, state = tx.update(grads, tx.init(params), params)
        rms = optim.update_rms(state)
        assert jax.tree.structure(rms) == jax.tree.structure(params)
        # Step 1: v = g^2, so every per-tensor rms is 1 (up to the eps floor).
        np.testing.assert_allclose(jax.tree.leaves(rms), 1.0, rtol=1e-5)
        assert float(optim.mean_update_rms(state)) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="exactly one StableAdamWState"):
        optim.update_rms(optax.adam(1e-3).init(params))


def test_bad_hyperparameters_and_missing_params():
    with pytest.raises(ValueError, match="b2 must be in"):
        optim.stable_adamw(1e-3, max_learning_rate=1e-3, b2=1.0)
    with pytest.raises(ValueError, match="max_learning_rate must be > 0"):
        optim.injectable_stable_adamw(max_learning_rate=0.0)
    tx = optim.stable_adamw(1e-3, max_learning_rate=1e-3)
    params = make_params()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------------


def ref_warmup_constant(t, peak, w):
    return peak * t / w if t < w else peak


def ref_one_minus_sqrt(t, peak, total, start, end):
    t = min(t, total)
    return peak * (end + (start - end) * (1 - np.sqrt(t / total)))


def ref_warmup_stable_decay(t, peak, w, total, d, final):
    if t < w:
        return peak * t / w
    if t < total - d:
        return peak
    if t < total:
        return peak * (1 - (1 - final) * (t - (total - d)) / d)
    return peak * final


def _points(*boundaries, n=40):
    """Many points from 0 to past the last boundary, the boundaries themselves and points just either side."""
    last = max(boundaries)
    pts = list(np.linspace(0.0, 1.2 * last, n)) + [0.0]
    for b in boundaries:
        pts += [b, b * (1 - 1e-4), b * (1 + 1e-4)]
    return pts


def _check_schedule(schedule, reference, points):
    jitted = jax.jit(schedule)
    for t in points:
        np.testing.assert_allclose(float(jitted(jnp.float32(t))), reference(t), rtol=1e-6, atol=1e-6, err_msg=f"t={t}")
    # Also with a Python int token count past int32 and a vector of counts.
    np.testing.assert_allclose(np.asarray(schedule(np.asarray(points))), [reference(t) for t in points],
                               rtol=1e-6, atol=1e-6)


def test_warmup_constant():
    w = 3e9  # 68m: 3B warmup tokens; peak 1.0 so that atol 1e-6 is a real check
    _check_schedule(optim.warmup_constant(1.0, w), lambda t: ref_warmup_constant(t, 1.0, w), _points(w, 1.7e12))
    assert float(optim.warmup_constant(3e-3, w)(1_700_000_000_000)) == pytest.approx(3e-3)
    assert float(optim.warmup_constant(3e-3, 0)(0)) == pytest.approx(3e-3)


@pytest.mark.parametrize("start,end", [(1.0, 0.5), (0.5, 0.02)])
def test_one_minus_sqrt(start, end):
    total = 250e9
    _check_schedule(optim.one_minus_sqrt(1.0, total, start, end),
                    lambda t: ref_one_minus_sqrt(t, 1.0, total, start, end), _points(total))


def test_one_minus_sqrt_phase2_is_the_reference_formula():
    # Reference: lr(t) = peak * (a + (1 - a)(1 - sqrt(t/T))), a = 0.5.
    peak, total, a = 8e-4, 250e9, 0.5
    schedule = optim.one_minus_sqrt(peak, total, 1.0, a)
    for t in np.linspace(0, total, 17):
        assert float(schedule(t)) == pytest.approx(peak * (a + (1 - a) * (1 - np.sqrt(t / total))), rel=1e-6)
    # Phase 3 starts where phase 2 ends.
    assert float(optim.one_minus_sqrt(peak, 50e9, 0.5, 0.02)(0)) == pytest.approx(float(schedule(total)), rel=1e-6)


def test_warmup_stable_decay():
    w, total, d, final = 3e9, 50e9, 10e9, 0.02
    _check_schedule(optim.warmup_stable_decay(1.0, w, total, d, final),
                    lambda t: ref_warmup_stable_decay(t, 1.0, w, total, d, final), _points(w, total - d, total))
    with pytest.raises(ValueError, match="exceeds total_tokens"):
        optim.warmup_stable_decay(1.0, 30e9, 50e9, 30e9, 0.02)


def test_make_schedule():
    made = optim.make_schedule("one_minus_sqrt", peak=1.0, total_tokens=100.0, start_frac=0.5, end_frac=0.02)
    assert float(made(25.0)) == pytest.approx(ref_one_minus_sqrt(25.0, 1.0, 100.0, 0.5, 0.02), rel=1e-6)
    assert float(optim.make_schedule("warmup_constant", peak=2.0, warmup_tokens=10)(5)) == pytest.approx(1.0)
    wsd = optim.make_schedule("warmup_stable_decay", peak=1.0, warmup_tokens=1, total_tokens=10, decay_tokens=2,
                              final_frac=0.02)
    assert float(wsd(10)) == pytest.approx(0.02)
    with pytest.raises(ValueError, match=r"unknown LR schedule 'cosine'.*one_minus_sqrt.*warmup_constant"):
        optim.make_schedule("cosine", peak=1.0)


def test_batch_size_warmup_endpoints_monotone_one_at_a_time():
    start, end, w = 4, 32, 1e9
    tokens = np.linspace(0, 1.1 * w, 20001)
    sizes = np.asarray(jax.jit(lambda t: optim.batch_size_warmup(t, start=start, end=end, warmup_tokens=w))(tokens))
    assert sizes.dtype == np.int32
    assert sizes[0] == start and sizes[-1] == end
    assert int(optim.batch_size_warmup(w, start=start, end=end, warmup_tokens=w)) == end
    assert int(optim.batch_size_warmup(w * (1 - 1e-3), start=start, end=end, warmup_tokens=w)) == end - 1
    steps = np.diff(sizes)
    assert steps.min() >= 0 and steps.max() == 1  # monotone, one sequence at a time
    assert set(sizes.tolist()) == set(range(start, end + 1))  # every size in between is used
    assert int(optim.batch_size_warmup(5e12, start=start, end=end, warmup_tokens=w)) == end  # past int32
    assert int(optim.batch_size_warmup(0, start=end, end=end, warmup_tokens=w)) == end


def test_batch_size_warmup_spends_equal_steps_at_each_size():
    # ModernBERT's thresholds give size b a token span proportional to b: the same number of steps at every size.
    start, end, seq_len = 2, 10, 100
    w = 50 * seq_len * sum(range(start, end))  # 50 steps at each size
    tokens, steps_at = 0, {}
    while tokens < w:
        n = int(optim.batch_size_warmup(tokens, start=start, end=end, warmup_tokens=w))
        steps_at[n] = steps_at.get(n, 0) + 1
        tokens += n * seq_len
    assert sorted(steps_at) == list(range(start, end))
    assert all(abs(c - 50) <= 1 for c in steps_at.values()), steps_at
    with pytest.raises(ValueError, match="start <= end"):
        optim.batch_size_warmup(0, start=8, end=4, warmup_tokens=w)
