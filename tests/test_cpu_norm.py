"""The native LayerNorm forward (ettin_jax/kernels/cpu/norm.py): equal to the plain XLA computation, gradients included,
and used only where it applies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import model, sizes
from ettin_jax.kernels.cpu import dots as cpu_dots
from ettin_jax.kernels.cpu import norm as cpu_norm
from tests.test_cpu_gemm import _hlo  # a tiny model's CLM gradient, lowered on a mesh of the given devices

needs_kernel = pytest.mark.skipif("avx512f" not in cpu_dots.cpu_flags(), reason="the native norm needs AVX-512")


def _plain(monkeypatch):
    monkeypatch.setattr(cpu_norm, "usable", lambda *a: False)


def _one_device():
    return jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))


# H: one vector, an odd number of vectors (a 16-wide tail after the 32-wide loop), the 150m's width
@needs_kernel
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 48), (130, 768)])
def test_equals_the_plain_norm_with_its_gradients(shape, monkeypatch):
    with _one_device():
        _equals_the_plain_norm(shape, monkeypatch)


def _equals_the_plain_norm(shape, monkeypatch):
    rng = np.random.default_rng(shape[-1])
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    assert cpu_norm.usable(x, scale, jnp.float32)
    f = jax.jit(lambda x, s: model.layer_norm(x, s, 1e-5, jnp.float32))
    native = jax.vjp(f, x, scale)
    assert cpu_norm.TARGET in f.lower(x, scale).as_text()
    stats = jax.jit(lambda x, s: model._layer_norm(x, s, 1e-5, jnp.float32))(x, scale)
    _plain(monkeypatch)
    f = jax.jit(lambda x, s: model.layer_norm(x, s, 1e-5, jnp.float32))
    plain = jax.vjp(f, x, scale)
    assert cpu_norm.TARGET not in f.lower(x, scale).as_text()
    want_stats = jax.jit(lambda x, s: model._layer_norm(x, s, 1e-5, jnp.float32))(x, scale)
    np.testing.assert_allclose(native[0], plain[0], atol=2e-6, rtol=0)
    for got, want, name in zip(native[1](dy), plain[1](dy), ("dx", "dscale")):
        np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))), rtol=0, err_msg=name)
    for got, want, name in zip(stats, want_stats, ("y", "mean", "rstd")):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=name)


@needs_kernel
def test_a_nan_stays_in_its_row():
    x = jnp.ones((70, 32)).at[7, 3].set(jnp.nan).at[8].set(jnp.arange(32.0))
    y, mean, rstd = cpu_norm.layer_norm(x, jnp.ones(32), 1e-5)
    assert np.isnan(y[7]).all() and np.isnan(mean[7]) and np.isnan(rstd[7])
    assert not np.isnan(np.delete(np.asarray(y), 7, axis=0)).any()


@needs_kernel
def test_bad_shapes_get_a_clear_error():
    out = (jax.ShapeDtypeStruct((4, 40), jnp.float32),) + (jax.ShapeDtypeStruct((4, 1), jnp.float32),) * 2
    assert cpu_norm.available()
    with pytest.raises(Exception, match="multiple of 16"):
        jax.block_until_ready(jax.ffi.ffi_call(cpu_norm.TARGET, out)(jnp.ones((4, 40)), jnp.ones(40),
                                                                    eps=np.float32(1e-5)))
    with pytest.raises(Exception, match="scale must be"):
        jax.block_until_ready(jax.ffi.ffi_call(cpu_norm.TARGET, out[:1] * 0 + (
            jax.ShapeDtypeStruct((4, 32), jnp.float32),) + out[1:])(jnp.ones((4, 32)), jnp.ones(16),
                                                                    eps=np.float32(1e-5)))


@pytest.mark.slow
@needs_kernel
def test_an_fp32_model_on_one_device_uses_it_and_nothing_else_does():
    """Every norm of a tiny fp32 model on one device (the embedding's, two a layer, the final one); not on two
    devices, in bf16, or for a width not a multiple of 16."""
    cfg = sizes.model_config("17m").replace(num_layers=2, vocab_size=300, hidden_size=64, intermediate_size=96,
                                            num_heads=2)
    one = jax.devices()[:1]
    assert _hlo(cfg, one, t=64).count(f"@{cpu_norm.TARGET}(") == 1 + 2 * 2 + 1
    assert cpu_norm.TARGET not in _hlo(cfg, jax.devices()[:2], t=64)
    assert cpu_norm.TARGET not in _hlo(cfg.replace(dtype="bfloat16"), one, t=64)
    assert cpu_norm.TARGET not in _hlo(cfg.replace(hidden_size=72, num_heads=2, intermediate_size=80), one, t=64)
