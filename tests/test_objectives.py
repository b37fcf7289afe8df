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


# -- what predicts what, written from the definitions (not from objectives.prediction_targets) ----------------------

CLS, SEP, MASK, T = 1, 2, 4, 24


def _packed_rows(seed=0):
    """Packed rows as the pipeline makes them ([CLS] ... [SEP] documents, segment ids 1.., positions restarting, pad
    0), with the cases that matter: several documents and padding; one document filling the whole row; a document
    ending exactly at the row's end; a row of padding only. MLM fields from the pipeline's own masking."""
    from ettin_jax.data import masking
    rng = np.random.default_rng(seed)
    layouts = [[7, 8, 5], [T], [3, T - 3], []]  # document lengths per row
    tokens = np.full((len(layouts), T), 3, np.int32)  # 3 = [PAD]
    seg = np.zeros_like(tokens)
    pos = np.zeros_like(tokens)
    for r, lengths in enumerate(layouts):
        at = 0
        for j, n in enumerate(lengths):
            tokens[r, at:at + n] = np.r_[CLS, rng.integers(5, 256, n - 2), SEP]
            seg[r, at:at + n] = j + 1
            pos[r, at:at + n] = np.arange(n)
            at += n
    batch = dict(tokens=tokens, segment_ids=seg, positions=pos)
    batch.update(masking.mlm_mask(tokens, seg, rate=0.3, seed=seed, step=0, first_row=0, special_ids=[0, 1, 2, 3, 4],
                                  mask_id=MASK, vocab_size=256))
    return batch


def _clm_targets_by_definition(batch):
    """{(row, t): label}: hidden t predicts token t + 1 iff both are in the same document (no padding)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    out = {}
    for r in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]:
                out[r, t] = int(tokens[r, t + 1])
    return out


def _masked_targets_by_definition(batch, shift):
    """{(row, slot): (hidden position, label, weight)}: the original token at each masked position p, predicted from
    p (MLM) or from p - 1 (MNTP, which never reaches into another document: p is never a document's first token)."""
    out = {}
    for (r, j), p in np.ndenumerate(batch["mlm_positions"]):
        w = float(batch["mlm_weights"][r, j])
        if w > 0:
            assert batch["segment_ids"][r, p - shift] == batch["segment_ids"][r, p] > 0
            out[r, j] = (p - shift, int(batch["tokens"][r, p]), w)
    return out


def test_clm_targets_follow_the_definition():
    batch = _packed_rows()
    expected = _clm_targets_by_definition(batch)
    assert len(expected) == (7 + 8 + 5 - 3) + (T - 1) + (3 + T - 3 - 2)  # each document: its length - 1
    index, labels, weights = map(np.asarray, objectives.prediction_targets(objectives.get_objective("clm"),
                                                                           {k: jnp.asarray(v) for k, v in batch.items()}))
    np.testing.assert_array_equal(index, np.broadcast_to(np.arange(T), index.shape))  # hidden t at slot t
    got = {(r, t): int(labels[r, t]) for r, t in zip(*np.nonzero(weights))}
    assert got == expected
    assert set(np.unique(weights)) <= {0.0, 1.0}


@pytest.mark.parametrize("name, shift", [("mlm", 0), ("mntp", 1)])
def test_masked_targets_follow_the_definition(name, shift):
    batch = _packed_rows()
    expected = _masked_targets_by_definition(batch, shift)
    assert len(expected) >= 8
    index, labels, weights = map(np.asarray, objectives.prediction_targets(objectives.get_objective(name),
                                                                           {k: jnp.asarray(v) for k, v in batch.items()}))
    got = {(r, j): (int(index[r, j]), int(labels[r, j]), float(weights[r, j])) for r, j in zip(*np.nonzero(weights))}
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clm", "mntp"])
def test_loss_fn_is_the_mean_nll_of_the_defined_targets(name):
    """loss_fn's loss equals the mean NLL, under the full [B, T, V] softmax, of the targets written out above."""
    cfg = sizes.model_config("tiny", vocab_size=256, attention_block=8, local_window=8)
    params = model.init_params(cfg, jax.random.key(1))
    m = model.Ettin(cfg)
    obj = objectives.get_objective(name)
    batch = _packed_rows(seed=1)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    inputs = jbatch["mlm_inputs"] if obj.masked_inputs else jbatch["tokens"]
    hidden = m.apply({"params": params}, inputs, mask=obj.mask, segment_ids=jbatch["segment_ids"],
                     positions=jbatch["positions"])
    logp = np.asarray(jax.nn.log_softmax(m.apply({"params": params}, hidden, method=model.Ettin.predict), -1),
                      np.float64)
    if name == "clm":
        terms = [(-logp[r, t, label], 1.0) for (r, t), label in _clm_targets_by_definition(batch).items()]
    else:
        terms = [(-logp[r, p, label] * w, w) for (r, _), (p, label, w) in _masked_targets_by_definition(batch, 1).items()]
    expected = sum(x for x, _ in terms) / sum(w for _, w in terms)
    loss, metrics = objectives.loss_fn(params, jbatch, model=m, objective=obj, chunk=16)
    assert float(metrics["predictions"]) == pytest.approx(sum(w for _, w in terms))
    assert float(loss) == pytest.approx(expected, rel=2e-5)
