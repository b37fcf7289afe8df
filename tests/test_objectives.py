"""Objectives: the sparse MLM head and the chunked (fused-gradient) cross-entropy equal the dense computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import kernels, model, objectives, sizes

V, H = 300, 16


def _dense_ce(x, emb, bias, labels, weights):
    logits = x @ emb.T + bias
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(weights * ce), jnp.sum(weights * correct)


def _inputs(n, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (n, H))
    emb = jax.random.normal(k[1], (V, H)) * 0.5
    bias = jax.random.normal(k[2], (V,)) * 0.1
    labels = jax.random.randint(k[3], (n,), 0, V)
    weights = (jax.random.uniform(k[4], (n,)) < 0.7).astype(jnp.float32)
    return x, emb, bias, labels, weights


@pytest.mark.parametrize("n,chunk", [(50, 16), (64, 64), (37, 1024)])
def test_decoder_cross_entropy_equals_dense_with_gradients(n, chunk):
    x, emb, bias, labels, weights = _inputs(n)
    got = kernels.decoder_cross_entropy(x, emb, bias, labels, weights, chunk)
    ref = _dense_ce(x, emb, bias, labels, weights)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], ref[1])
    np.testing.assert_allclose(got[2], weights.sum())

    def scaled(f):  # a non-unit upstream cotangent, through both outputs
        return lambda *a: 3.0 * f(*a)[0] + 0.5 * f(*a)[1]

    fused = scaled(lambda *a: kernels.decoder_cross_entropy(*a[:3], labels, a[3], chunk))
    dense = scaled(lambda *a: _dense_ce(*a[:3], labels, a[3]))
    g_got = jax.jit(jax.grad(fused, argnums=(0, 1, 2, 3)))(x, emb, bias, weights)
    g_ref = jax.grad(dense, argnums=(0, 1, 2, 3))(x, emb, bias, weights)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_equals_dense():
    x, emb, bias, labels, weights = _inputs(70, seed=1)
    predict = lambda h: h @ emb.T + bias
    got = jax.jit(lambda x: objectives.chunked_cross_entropy(predict, x, labels, weights, chunk=32))(x)
    ref = _dense_ce(x, emb, bias, labels, weights)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], ref[1])
    g_got = jax.grad(lambda x: objectives.chunked_cross_entropy(predict, x, labels, weights, chunk=32)[0])(x)
    g_ref = jax.grad(lambda x: _dense_ce(x, emb, bias, labels, weights)[0])(x)
    np.testing.assert_allclose(g_got, g_ref, atol=1e-5)


def _batch(t=48, b=2, p=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 256, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, 30:] = 2
    seg[1, 40:] = 0
    pos = np.stack([np.r_[np.arange(30), np.arange(t - 30)], np.r_[np.arange(40), np.zeros(t - 40)]]).astype(np.int32)
    mlm_pos = np.sort(np.stack([rng.choice(np.arange(1, 40), p, replace=False) for _ in range(b)]), 1).astype(np.int32)
    weights = np.ones((b, p), np.float32)
    weights[1, -3:] = 0.0
    labels = np.take_along_axis(tokens, mlm_pos, 1)
    inputs = tokens.copy()
    np.put_along_axis(inputs, mlm_pos, 4, 1)
    return {k: jnp.asarray(v) for k, v in dict(
        tokens=tokens, segment_ids=seg, positions=pos, mlm_inputs=inputs, mlm_positions=mlm_pos,
        mlm_labels=labels, mlm_weights=weights).items()}


def _dense_loss(params, batch, m, obj):
    """Every position through the head and the full [B, T, V] logits; then pick the predicting positions."""
    inputs = batch["mlm_inputs"] if obj.masked_inputs else batch["tokens"]
    hidden = m.apply({"params": params}, inputs, mask=obj.mask, segment_ids=batch["segment_ids"],
                     positions=batch["positions"])
    logits = m.apply({"params": params}, hidden, method=model.Ettin.predict)  # [B, T, V]
    index, labels, weights = objectives.prediction_targets(obj, batch)
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, index[..., None], 1)  # [B, P, V]
    nll = -jnp.take_along_axis(picked, labels[..., None], -1)[..., 0]
    return jnp.sum(weights * nll) / jnp.maximum(jnp.sum(weights), 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlm", "clm", "mntp"])
def test_loss_fn_equals_dense_computation(name):
    cfg = sizes.model_config("tiny", vocab_size=256, attention_block=16, local_window=8)
    params = model.init_params(cfg, jax.random.key(0))
    m = model.Ettin(cfg)
    obj = objectives.get_objective(name)
    batch = _batch()
    sparse = jax.jit(jax.value_and_grad(
        lambda p: objectives.loss_fn(p, batch, model=m, objective=obj, chunk=7)[0]))
    dense = jax.jit(jax.value_and_grad(lambda p: _dense_loss(p, batch, m, obj)))
    (l1, g1), (l2, g2) = sparse(params), dense(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
