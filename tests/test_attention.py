"""Every attention path equals `reference_attention` (fp32, 1e-5) for every mask kind, window and segment layout.

Paths: blocked (sliding windows, CPU/XLA), chunked (query chunks, with and without recomputation), the cuDNN
path's arguments (run through jax.nn.dot_product_attention's XLA implementation, which reads them the same way;
cuDNN itself needs a GPU), and TPU splash attention in Pallas interpret mode (slow on CPU: marked slow but one).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import attention

W = 16
BANDS = {
    "encoder-global": (None, None),
    "encoder-local": (W, W),  # +-W: 2W+1 keys
    "decoder-global": (None, 0),
    "decoder-local-hf": (W - 1, 0),  # HF ModernBertDecoder: W keys including the query
    "decoder-local-ettin": (W, 0),  # Ettin's training code: W+1 keys
    "asymmetric": (W, 3),
}
BOUNDED = [k for k, (b, a) in BANDS.items() if b is not None and a is not None]


def layouts(t):
    return {
        "one": np.ones((2, t), np.int32),
        "padded": np.stack([np.r_[np.ones(t - 23), np.zeros(23)], np.ones(t)]).astype(np.int32),
        "packed": np.stack([np.r_[np.full(40, 1), np.full(t - 50, 2), np.zeros(10)],
                            np.r_[np.full(7, 1), np.full(60, 2), np.full(t - 67, 3)]]).astype(np.int32),
    }


def qkv(t, seed=0, h=2, d=8):
    k = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(x, (2, t, h, d)) for x in k)


def reference(q, k, v, seg, band):
    return jax.jit(attention.reference_attention, static_argnames="band")(q, k, v, q_seg=seg, k_seg=seg, band=band)


@pytest.mark.parametrize("band", BOUNDED)
@pytest.mark.parametrize("layout", ["one", "padded", "packed"])
@pytest.mark.parametrize("t,block", [(100, 16), (96, 32)])
def test_blocked_equals_reference(band, layout, t, block):
    q, k, v = qkv(t)
    seg = jnp.asarray(layouts(t)[layout])
    got = jax.jit(attention.blocked_attention, static_argnames=("band", "block"))(
        q, k, v, segment_ids=seg, band=BANDS[band], block=block)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)


@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("layout", ["one", "padded", "packed"])
@pytest.mark.parametrize("remat", [False, True])
def test_chunked_equals_reference(band, layout, remat):
    t = 100
    q, k, v = qkv(t, seed=1)
    seg = jnp.asarray(layouts(t)[layout])
    got = jax.jit(attention.chunked_attention, static_argnames=("band", "chunk", "remat"))(
        q, k, v, segment_ids=seg, band=BANDS[band], chunk=32, remat=remat)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)


@pytest.mark.parametrize("impl,band", [("blocked", "encoder-local"), ("blocked", "decoder-local-hf"),
                                       ("chunked", "decoder-global"), ("chunked", "encoder-global")])
def test_gradients_equal_reference(impl, band):
    t = 80
    q, k, v = qkv(t, seed=2)
    seg = jnp.asarray(layouts(t)["packed"])
    if impl == "blocked":
        f = lambda q, k, v: attention.blocked_attention(q, k, v, segment_ids=seg, band=BANDS[band], block=16)
    else:
        f = lambda q, k, v: attention.chunked_attention(q, k, v, segment_ids=seg, band=BANDS[band], chunk=32,
                                                        remat=True)
    r = lambda q, k, v: attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=BANDS[band])
    w = jax.random.normal(jax.random.key(9), q.shape)
    loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))
    for a, b in zip(loss(f)(q, k, v), loss(r)(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("layout", ["one", "padded", "packed"])
def test_cudnn_arguments_mean_the_band(band, layout):
    """The arguments the cuDNN path passes, read by jax.nn.dot_product_attention's XLA implementation."""
    t = 100
    q, k, v = qkv(t, seed=3)
    seg = jnp.asarray(layouts(t)[layout])
    args = attention.cudnn_arguments(seg, BANDS[band])
    if band in ("encoder-local", "asymmetric"):  # a right window: cuDNN cannot, the dispatcher goes blocked
        assert args is None
        assert attention.resolve_impl("cudnn", BANDS[band], 1024) == "blocked"
        assert attention.resolve_impl("auto", BANDS[band], 1024, platform="gpu") == "blocked"
        return
    if BANDS[band] == (None, 0) or BANDS[band][1] == 0:
        assert args["is_causal"]
    if BANDS[band][0] is not None:
        assert args["local_window_size"] == (BANDS[band][0], 0)
    got = jax.nn.dot_product_attention(q, k, v, implementation="xla", **args)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)
    assert attention.resolve_impl("auto", BANDS[band], 1024, platform="gpu") == "cudnn"


def test_dispatch():
    assert attention.resolve_impl("auto", (64, 64), 1024, platform="cpu") == "blocked"
    assert attention.resolve_impl("auto", (64, 64), 100, platform="cpu") == "chunked"
    assert attention.resolve_impl("auto", (None, 0), 1024, platform="cpu") == "chunked"
    assert attention.resolve_impl("auto", (None, None), 1024, platform="tpu") == "splash"
    assert attention.resolve_impl("auto", (64, 64), 1000, platform="tpu") == "blocked"  # not a multiple of 128
    with pytest.raises(ValueError, match="unknown attention implementation 'flash3'"):
        attention.resolve_impl("flash3", (None, None), 8)
    t = 100
    q, k, v = qkv(t, seed=4)
    seg = jnp.asarray(layouts(t)["packed"])
    for band in BANDS.values():
        ref = reference(q, k, v, seg, band)
        for impl in ("auto", "xla", "blocked", "chunked"):
            got = attention.self_attention(q, k, v, segment_ids=seg, band=band, impl=impl, block=16)
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{impl} {band}")


SPLASH_CASES = [(band, layout) for band in ("encoder-global", "encoder-local", "decoder-global", "decoder-local-hf",
                                            "decoder-local-ettin", "asymmetric")
                for layout in ("one", "padded", "packed")]


@pytest.mark.parametrize("band,layout", [
    pytest.param(b, l, marks=() if (b, l) == ("encoder-local", "packed") else pytest.mark.slow)
    for b, l in SPLASH_CASES])
def test_splash_interpret_equals_reference(band, layout):
    t = 256  # splash tiles are multiples of 128
    q, k, v = qkv(t, seed=5, d=64)
    seg = jnp.asarray(layouts(t)[layout])
    got = jax.jit(lambda q, k, v, s: attention.splash_attention(
        q, k, v, segment_ids=s, band=BANDS[band], block=128, interpret=True))(q, k, v, seg)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("band", ["encoder-local", "decoder-global"])
def test_splash_interpret_gradients_equal_reference(band):
    t = 256
    q, k, v = qkv(t, seed=6, d=64)
    seg = jnp.asarray(layouts(t)["packed"])
    w = jax.random.normal(jax.random.key(9), q.shape)
    f = lambda q, k, v: attention.splash_attention(q, k, v, segment_ids=seg, band=BANDS[band], block=128,
                                                   interpret=True)
    r = lambda q, k, v: attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=BANDS[band])
    loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))
    for a, b in zip(loss(f)(q, k, v), loss(r)(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)
