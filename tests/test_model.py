"""The model: sizes, one pytree for encoder and decoder, packing isolation, attention paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import attention, kernels, model, sizes
from ettin_jax.kernels import xla_attention


@pytest.mark.parametrize("size", [n for n, s in sizes.SIZES.items() if s.reference_params])
def test_parameter_counts_match_reference(size):
    params, specs = model.abstract_params(sizes.model_config(size))  # shapes only: the 1b costs no memory
    backbone_ref, total_ref = sizes.SIZES[size].reference_params
    head = sum(model.count_params(params[k]) for k in ("head_dense", "head_norm", "decoder_bias"))
    assert model.count_params(params) == total_ref
    assert model.count_params(params) - head == backbone_ref
    assert "attn_norm" not in params["layers_0"] and "attn_norm" in params["layers_1"]
    assert specs["tok_embeddings"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_rope_tables_are_exactly_cos_and_sin():
    """The tables leave rope_tables through a product with the identity (so XLA materialises them once instead of
    evaluating cos and sin inside every consumer): the values must be cos and sin exactly (under jit, up to
    XLA's own fused cos and sin)."""
    positions = jnp.asarray(np.r_[np.arange(300), np.arange(212)][None].repeat(2, 0))
    for theta in (10_000.0, 160_000.0):
        inv_freq = 1.0 / (theta ** (jnp.arange(0, 64, 2, dtype=jnp.float32) / 64))
        emb = jnp.concatenate([positions.astype(jnp.float32)[..., None] * inv_freq] * 2, axis=-1)
        got = model.rope_tables(positions, 64, theta)
        np.testing.assert_array_equal(got[0], jnp.cos(emb))
        np.testing.assert_array_equal(got[1], jnp.sin(emb))
        got = jax.jit(model.rope_tables, static_argnums=(1, 2))(positions, 64, theta)
        np.testing.assert_allclose(got[0], jnp.cos(emb), atol=2e-5)
        np.testing.assert_allclose(got[1], jnp.sin(emb), atol=2e-5)


def _plain_layer_norm(x, scale, eps=1e-5):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps) * scale


def _plain_geglu(h):
    inp, gate = jnp.split(h, 2, axis=-1)
    return jax.nn.gelu(inp, approximate=False) * gate


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_layer_norm_and_geglu_vjps_equal_autodiff(jit):
    """layer_norm and geglu have hand-written backward passes (they keep less for the backward pass than autodiff
    does): values and gradients must be autodiff's of the plain expressions, eagerly and under jit (where XLA's
    rewrites of the recomputation run), including rows with a large mean and activations far into GELU's tails."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 37, 48)) * 3 + rng.normal(size=(2, 37, 1)) * 20, jnp.float32)
    scale = jnp.asarray(rng.normal(size=48), jnp.float32)
    h = jnp.asarray(rng.normal(size=(2, 37, 64)) * 4, jnp.float32)
    w_x, w_h = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 37, 48), (2, 37, 32)))
    wrap = jax.jit if jit else (lambda f: f)

    def grads(norm, act):
        loss = lambda x, s, h: jnp.sum(norm(x, s) * w_x) + jnp.sum(act(h) * w_h)
        return wrap(lambda x, s, h: (norm(x, s), act(h), jax.grad(loss, (0, 1, 2))(x, s, h)))(x, scale, h)

    got = grads(lambda x, s: model.layer_norm(x, s, 1e-5, jnp.float32), model.geglu)
    want = grads(_plain_layer_norm, _plain_geglu)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # bf16 activations: the output and the input's gradient come back in bf16, computed in fp32
    assert model.layer_norm(x.astype(jnp.bfloat16), scale, 1e-5, jnp.bfloat16).dtype == jnp.bfloat16
    dx = jax.grad(lambda x: jnp.sum(model.layer_norm(x, scale, 1e-5, jnp.bfloat16).astype(jnp.float32)
                                    * w_x))(x.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(dx.astype(jnp.float32), want[2][0], rtol=0.05, atol=0.05)


def _tiny(**kw):
    cfg = sizes.model_config("tiny", vocab_size=256, **kw)
    return cfg, model.init_params(cfg, jax.random.key(0))


def _apply(cfg):
    """Jitted model.apply (eager Flax dispatches op by op and compiles each one)."""
    return jax.jit(model.Ettin(cfg).apply, static_argnames=("mask",))


def test_same_pytree_runs_as_encoder_and_decoder():
    cfg, params = _tiny()
    m = model.Ettin(cfg)
    m.apply = _apply(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 5, 256)
    enc = m.apply({"params": params}, tokens, mask=attention.BIDIRECTIONAL)
    dec = m.apply({"params": params}, tokens, mask=attention.CAUSAL)
    assert enc.shape == dec.shape == (2, 40, cfg.hidden_size)
    # The decoder's position t ignores the future; the encoder's does not.
    changed = tokens.at[:, 30:].set(7)
    dec2 = m.apply({"params": params}, changed, mask=attention.CAUSAL)
    enc2 = m.apply({"params": params}, changed, mask=attention.BIDIRECTIONAL)
    np.testing.assert_allclose(dec[:, :30], dec2[:, :30], atol=1e-6)
    assert np.abs(enc[:, :30] - enc2[:, :30]).max() > 1e-3
    # Layer 0 sees the whole document in both (the decoder's first token sees only itself).
    assert np.abs(enc[:, 0] - dec[:, 0]).max() > 1e-3


@pytest.mark.parametrize("mask", [attention.BIDIRECTIONAL, attention.CAUSAL])
@pytest.mark.parametrize("impl", ["xla", pytest.param("blocked", marks=pytest.mark.slow)])
def test_packed_documents_do_not_see_each_other(mask, impl):
    cfg, params = _tiny(attention_impl=impl, attention_block=16, local_window=8)
    m = model.Ettin(cfg)
    m.apply = _apply(cfg)
    a = jax.random.randint(jax.random.key(2), (1, 37), 5, 256)
    b = jax.random.randint(jax.random.key(3), (1, 50), 5, 256)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 13), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 37 + [2] * 50 + [0] * 13])
    pos = jnp.array([list(range(37)) + list(range(50)) + [0] * 13])
    out = m.apply({"params": params}, packed, mask=mask, segment_ids=seg, positions=pos)
    alone_a = m.apply({"params": params}, a, mask=mask)
    alone_b = m.apply({"params": params}, b, mask=mask)
    np.testing.assert_allclose(out[:, :37], alone_a, atol=2e-5)
    np.testing.assert_allclose(out[:, 37:87], alone_b, atol=2e-5)


def test_windows_follow_reference_and_hf_semantics():
    cfg = sizes.model_config("17m")
    assert cfg.layer_types[0] == cfg.layer_types[3] == cfg.layer_types[6] == model.GLOBAL
    assert cfg.layer_types[1] == model.LOCAL
    assert cfg.band(attention.BIDIRECTIONAL, 1) == (64, 64)  # +-64: 129 keys
    assert cfg.band(attention.CAUSAL, 1) == (63, 0)  # HF ModernBertDecoder: 64 keys incl. itself
    assert cfg.replace(decoder_window=65).band(attention.CAUSAL, 1) == (64, 0)  # Ettin training: 65 keys
    assert cfg.band(attention.CAUSAL, 0) == (None, 0)
    assert cfg.band(attention.BIDIRECTIONAL, 0) == (None, None)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_heads 3"):
        model.ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown model size '2b'"):
        sizes.model_config("2b")
    with pytest.raises(ValueError, match="unknown attention mask"):
        attention.get_mask("sideways")


def _qkv(key, b, t, h=2, d=8):
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.normal(k1, (b, t, h, d)), jax.random.normal(k2, (b, t, h, d)),
            jax.random.normal(k3, (b, t, h, d)))


SEGMENTS = {
    "one": lambda t: np.ones((2, t), np.int32),
    "padded": lambda t: np.stack([np.r_[np.ones(t - 23), np.zeros(23)], np.ones(t)]).astype(np.int32),
    "packed": lambda t: np.stack([np.r_[np.full(40, 1), np.full(t - 50, 2), np.zeros(10)],
                                  np.r_[np.full(7, 1), np.full(60, 2), np.full(t - 67, 3)]]).astype(np.int32),
}


@pytest.mark.parametrize("band", [(16, 16), (15, 0), (16, 0), (8, 8), (16, 3)])
@pytest.mark.parametrize("layout", list(SEGMENTS))
@pytest.mark.parametrize("t", [100, pytest.param(128, marks=pytest.mark.slow)])
def test_blocked_attention_equals_reference(band, layout, t):
    q, k, v = _qkv(jax.random.key(t), 2, t)
    seg = jnp.asarray(SEGMENTS[layout](t))
    ref = jax.jit(attention.reference_attention, static_argnames="band")(q, k, v, q_seg=seg, k_seg=seg, band=band)
    got = jax.jit(xla_attention.blocked_attention, static_argnames=("band", "block"))(
        q, k, v, segment_ids=seg, band=band, block=16)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_self_attention_dispatch():
    q, k, v = _qkv(jax.random.key(0), 2, 100)
    seg = jnp.asarray(SEGMENTS["packed"](100))
    for band in [(None, None), (None, 0), (16, 16), (15, 0)]:
        ref = attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=band)
        for impl in ["auto", "xla", "blocked"]:
            got = kernels.self_attention(q, k, v, segment_ids=seg, band=band, impl=impl, block=16)
            np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        kernels.self_attention(q, k, v, segment_ids=seg, band=(None, None), impl="flash3")


@pytest.mark.slow
def test_kv_cache_decoding_equals_full_forward():
    """Prefills and steps of any length equal one causal forward, while the sliding-window layers' ring caches (4
    slots here) wrap: chunks longer than the window, chunks at a nonzero index, single tokens."""
    cfg, params = _tiny(local_window=4)
    m = model.Ettin(cfg)
    m.apply = _apply(cfg)
    tokens = jax.random.randint(jax.random.key(4), (1, 24), 5, 256)
    full = m.apply({"params": params}, tokens, mask=attention.CAUSAL)
    cache = model.init_cache(cfg, 1, 32)
    slots = {c["k"].shape[1] for c in cache["layers"]}
    assert slots == {4, 32}, slots  # local layers keep their window, global layers everything
    steps, start = [], 0
    for n in [10, 3, 1, 1, 5, 1, 2, 1]:
        h, cache = m.apply({"params": params}, tokens[:, start:start + n], mask=attention.CAUSAL, cache=cache)
        steps.append(h)
        start += n
    assert start == 24 and int(cache["index"]) == 24
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    with pytest.raises(ValueError, match="for causal decoding"):
        m.apply({"params": params}, tokens[:, :1], mask=attention.BIDIRECTIONAL, cache=model.init_cache(cfg, 1, 8))


@pytest.mark.slow
def test_transposed_output_kernels_give_the_same_model():
    """`transpose_for_decoding` stores the Wo kernels as kernel_t [out, in]: the same function; a kernel_t of the
    wrong shape is an error."""
    cfg, params = _tiny()
    m = model.Ettin(cfg)
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 5, 256)
    flipped = model.transpose_for_decoding(params)
    assert "kernel_t" in flipped["layers_0"]["attn"]["Wo"] and "kernel_t" in flipped["layers_0"]["mlp"]["Wo"]
    assert "kernel" in flipped["layers_0"]["attn"]["Wqkv"]
    for mask in (attention.CAUSAL, attention.BIDIRECTIONAL):
        np.testing.assert_allclose(m.apply({"params": flipped}, tokens, mask=mask),
                                   m.apply({"params": params}, tokens, mask=mask), atol=1e-5)
    flipped["layers_0"]["mlp"]["Wo"]["kernel_t"] = params["layers_0"]["mlp"]["Wo"]["kernel"]
    with pytest.raises(ValueError, match="kernel_t has shape"):
        m.apply({"params": flipped}, tokens, mask=attention.CAUSAL)


@pytest.mark.slow
def test_remat_and_bf16_run():
    cfg, params = _tiny(remat="full", dtype="bfloat16")
    m = model.Ettin(cfg)
    tokens = jnp.ones((1, 16), jnp.int32)

    def f(p):
        return m.apply({"params": p}, tokens, mask=attention.CAUSAL).astype(jnp.float32).sum()

    g = jax.jit(jax.grad(f))(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g))
    assert np.isfinite(sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(g)))


@pytest.mark.parametrize("impl", ["auto", *kernels.ATTENTION])
def test_initialisation_works_with_every_attention_implementation(impl):
    """init runs the model on a (1, 8) dummy batch, which splash's 128-row tiles cannot take (its error was
    `bkv_compute=8 must be a multiple of 128`): parameters do not depend on the implementation, so init attends
    densely and every implementation gets the same parameters."""
    cfg = sizes.model_config("tiny", vocab_size=64, attention_impl=impl)
    got = model.init_params(cfg, jax.random.key(0))
    want = model.init_params(cfg.replace(attention_impl="xla"), jax.random.key(0))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), got, want))
    shapes, _ = model.abstract_params(cfg)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(got)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_with_dropout_initialises_and_equals_no_remat(remat):
    """Rematerialised blocks take `band` and `deterministic` as static arguments (flax counts the module as argument
    0): with dropout on (Ettin's pretraining: 0.1) the model initialises, and its loss and gradients under one dropout
    key equal those without remat. (`ettin compile` of the 1b with remat found the wrong argument numbers.)"""
    cfg = sizes.model_config("tiny", vocab_size=64, attention_dropout=0.1, local_window=8)
    params = model.init_params(cfg.replace(remat=remat), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 64)

    def loss(c):
        def f(p):
            h = model.Ettin(c).apply({"params": p}, tokens, mask=attention.BIDIRECTIONAL, deterministic=False,
                                     rngs={"dropout": jax.random.key(2)})
            return jnp.mean(h ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    (a, ga), (b, gb) = loss(cfg.replace(remat=remat)), loss(cfg)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6)
