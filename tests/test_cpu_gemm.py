"""The native fp32 projection products (ettin_jax/kernels/cpu/gemm.py): equal to the plain products, used only where they
apply."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import model, objectives, sizes
from ettin_jax.kernels.cpu import dots as cpu_dots
from ettin_jax.kernels.cpu import gemm as cpu_gemm

needs_kernel = pytest.mark.skipif("avx512f" not in cpu_dots.cpu_flags(), reason="the native gemm needs AVX-512")


def _ref(lhs, rhs, form):
    a, b = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    return {0: lambda: a @ b, 1: lambda: a @ b.T, 2: lambda: a.T @ b}[form]()


# (rows of the result, reduction, columns of the result): ragged rows (below one 12-row tile, across 48-row
# blocks), reductions across the registers' 256-entry runs (300, 520) and, for y and dx, longer than one 1152-entry
# chunk (2100: two of 1050; the tolerance holds only with the runs), for dW's form reductions over the tokens split
# into fewer than 8 runs and into 8 with empty ones (2100 = 4 x 512 + 52), one 32-column panel
@needs_kernel
@pytest.mark.parametrize("rows, red, n", [(1, 32, 32), (13, 40, 96), (100, 300, 64), (40, 2100, 288),
                                          (600, 520, 32)])
@pytest.mark.parametrize("form", [0, 1, 2])
def test_each_form_equals_the_plain_product(rows, red, n, form):
    rng = np.random.default_rng(rows + red + n)
    lhs_shape, rhs_shape = {0: ((rows, red), (red, n)), 1: ((rows, red), (n, red)), 2: ((red, rows), (red, n))}[form]
    lhs = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
    got = jax.jit(cpu_gemm.product, static_argnums=2)(lhs, rhs, form)
    want = _ref(lhs, rhs, form)
    assert got.shape == want.shape == (rows, n)
    np.testing.assert_allclose(got, want, atol=3e-6 * np.sqrt(red), rtol=0)


@needs_kernel
def test_dense_and_its_gradients_equal_jnp_dot():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 100, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 100, 96)), jnp.float32)
    out = []
    for f in (cpu_gemm.dense, jnp.dot):
        y, vjp = jax.vjp(jax.jit(f), x, w)
        out.append((y, *vjp(g)))
    for got, want, name in zip(out[0], out[1], ("y", "dx", "dW")):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=0, err_msg=name)


@needs_kernel
def test_a_nan_stays_in_its_row():
    x = jnp.ones((300, 64)).at[7, 3].set(jnp.nan)
    y = np.asarray(cpu_gemm.product(x, jnp.ones((64, 32)), 0))
    assert np.isnan(y[7]).all() and not np.isnan(np.delete(y, 7, axis=0)).any()


@needs_kernel
def test_bad_shapes_get_a_clear_error():
    with pytest.raises(Exception, match="multiple of 32"):
        jax.block_until_ready(cpu_gemm.product(jnp.ones((8, 64)), jnp.ones((64, 40)), 0))
    with pytest.raises(Exception, match="inner dimensions"):
        jax.block_until_ready(jax.ffi.ffi_call(cpu_gemm.TARGET, jax.ShapeDtypeStruct((8, 32), jnp.float32))(
            jnp.ones((8, 64)), jnp.ones((48, 32)), form=np.int64(0)))
    with pytest.raises(Exception, match="form must be"):
        jax.block_until_ready(jax.ffi.ffi_call(cpu_gemm.TARGET, jax.ShapeDtypeStruct((8, 32), jnp.float32))(
            jnp.ones((8, 64)), jnp.ones((64, 32)), form=np.int64(3)))


def _hlo(cfg, devices, t=128):
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, t), 5, cfg.vocab_size)
    batch = dict(tokens=tokens, segment_ids=jnp.ones_like(tokens), positions=jnp.broadcast_to(jnp.arange(t), (2, t)))
    fn = jax.jit(jax.grad(lambda p: objectives.loss_fn(p, batch, model=model.Ettin(cfg),
                                                       objective=objectives.get_objective("clm"))[0]))
    with jax.set_mesh(jax.make_mesh((len(devices),), ("data",), devices=devices)):
        return fn.lower(params).as_text()


@pytest.mark.slow
@needs_kernel
def test_an_fp32_model_on_one_device_uses_it_and_nothing_else_does():
    """Every projection of a tiny fp32 model (4 a layer) on one device with 256 rows; not on two devices, in bf16,
    for widths not a multiple of 32, or for fewer rows."""
    cfg = sizes.model_config("17m").replace(num_layers=2, vocab_size=300, hidden_size=64, intermediate_size=96,
                                            num_heads=2)
    one = jax.devices()[:1]
    assert _hlo(cfg, one).count(cpu_gemm.TARGET) >= 4 * 2 * 3  # forward, dx and dW of each
    assert cpu_gemm.TARGET not in _hlo(cfg, jax.devices()[:2])
    assert cpu_gemm.TARGET not in _hlo(cfg.replace(dtype="bfloat16"), one)
    assert cpu_gemm.TARGET not in _hlo(cfg.replace(hidden_size=80, num_heads=2, intermediate_size=80), one)
    assert cpu_gemm.TARGET not in _hlo(cfg, one, t=64)
