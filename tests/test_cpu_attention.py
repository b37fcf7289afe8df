"""The native CPU attention (ettin_jax/kernels/cpu/attention.py): equal to the reference, used only where it applies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import attention, model, objectives, sizes
from ettin_jax.kernels.cpu import attention as cpu_attention
from ettin_jax.kernels.cpu import dots as cpu_dots

needs_kernel = pytest.mark.skipif("avx512f" not in cpu_dots.cpu_flags(), reason="the native attention needs AVX-512")
B, T, H, D = 2, 192, 2, 64


def _inputs(seed=0, d=D):
    k = jax.random.split(jax.random.key(seed), 2)
    qkv = jax.random.normal(k[0], (B, T, 3, H, d))
    do = jax.random.normal(k[1], (B, T, H, d))
    # packed rows: two documents and padding in row 0, one document and padding in row 1
    seg = jnp.stack([jnp.where(jnp.arange(T) < 70, 1, jnp.where(jnp.arange(T) < 170, 2, 0)),
                     jnp.where(jnp.arange(T) < 150, 1, 0)]).astype(jnp.int32)
    positions = jnp.stack([jnp.where(jnp.arange(T) < 70, jnp.arange(T), jnp.arange(T) - 70), jnp.arange(T)])
    cos, sin = model.rope_tables(positions, d, 10_000.0)
    return qkv, cos, sin, do, seg


def _both(qkv, cos, sin, do, seg, band):
    """(output, d qkv) of the native kernel and of reference_attention after model.apply_rope."""
    native = jax.jit(lambda qkv: cpu_attention.attention(qkv, cos, sin, seg, band))

    def ref(qkv):
        q, k, v = (qkv[:, :, i] for i in range(3))
        q, k = model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin)
        return attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=band)

    out = []
    for f in (native, ref):
        o, vjp = jax.vjp(f, qkv)
        out.append((o, vjp(do)[0]))
    return out


@needs_kernel
@pytest.mark.parametrize("band", [(None, None), (None, 0), (64, 64), (63, 0), (5, 7), (100, 3)],
                         ids=["global", "causal", "local", "causal-local", "narrow", "lopsided"])
@pytest.mark.parametrize("d", [64, 32])
def test_equals_the_reference_with_gradients(band, d):
    qkv, cos, sin, do, seg = _inputs(d=d)
    (o, grad), (ref_o, ref_grad) = _both(qkv, cos, sin, do, seg, band)
    np.testing.assert_allclose(o, ref_o, atol=2e-6, rtol=0)
    for i, name in enumerate("qkv"):
        scale = float(jnp.max(jnp.abs(ref_grad[:, :, i])))
        np.testing.assert_allclose(grad[:, :, i], ref_grad[:, :, i], atol=2e-6 * scale, rtol=0, err_msg=f"d{name}")


@needs_kernel
@pytest.mark.parametrize("band", [(None, None), (None, 0), (64, 64)], ids=["global", "causal", "local"])
def test_long_rows_equal_the_reference(band):
    """Rows longer than the forward's 512-key step: its online softmax across steps, a row whose one document
    fills it (every block all visible, no masks computed), and in the other a second document from position 600,
    whose queries see nothing in the first step."""
    t = 1088
    k = jax.random.split(jax.random.key(3), 2)
    qkv = jax.random.normal(k[0], (2, t, 3, 1, D))
    do = jax.random.normal(k[1], (2, t, 1, D))
    seg = jnp.stack([jnp.ones(t), jnp.where(jnp.arange(t) < 600, 1, 2)]).astype(jnp.int32)
    positions = jnp.stack([jnp.arange(t), jnp.where(jnp.arange(t) < 600, jnp.arange(t), jnp.arange(t) - 600)])
    cos, sin = model.rope_tables(positions, D, 10_000.0)
    (o, grad), (ref_o, ref_grad) = _both(qkv, cos, sin, do, seg, band)
    np.testing.assert_allclose(o, ref_o, atol=2e-6, rtol=0)
    scale = float(jnp.max(jnp.abs(ref_grad)))
    np.testing.assert_allclose(grad, ref_grad, atol=2e-6 * scale, rtol=0)


@needs_kernel
def test_a_nan_stays_in_the_rows_that_see_it():
    """A NaN in one query's features: that query's output is NaN and nothing else's (as the reference); a NaN in
    one key: the outputs of the queries that see it are NaN."""
    qkv, cos, sin, do, seg = _inputs(seed=1)
    for bad in (qkv.at[0, 10, 0, 1, 3].set(jnp.nan), qkv.at[1, 100, 1, 0, 3].set(jnp.nan)):
        (o, _), (ref_o, _) = _both(bad, cos, sin, do, seg, (64, 64))
        np.testing.assert_array_equal(np.isnan(o), np.isnan(ref_o))
        assert np.isnan(o).any()


@needs_kernel
def test_bad_shapes_get_a_clear_error():
    qkv, cos, sin, _, seg = _inputs()
    with pytest.raises(Exception, match="multiple of 64"):
        jax.block_until_ready(cpu_attention.attention(qkv[:, :100], cos[:, :100], sin[:, :100], seg[:, :100],
                                                      (None, None)))


def _loss_and_hlo(cfg, t, devices, *, native=True, monkeypatch=None):
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, t), 5, cfg.vocab_size)
    seg = jnp.where(jnp.arange(t) < t - 20, 1, 0) * jnp.ones((2, 1), jnp.int32)
    batch = dict(tokens=tokens, segment_ids=seg, positions=jnp.broadcast_to(jnp.arange(t), (2, t)))
    if not native:
        monkeypatch.setattr(cpu_attention, "usable", lambda *a: False)
    fn = jax.jit(jax.value_and_grad(lambda p: objectives.loss_fn(p, batch, model=model.Ettin(cfg),
                                                                 objective=objectives.get_objective("clm"))[0]))
    with jax.set_mesh(jax.make_mesh((len(devices),), ("data",), devices=devices)):
        hlo = fn.lower(params).as_text()
        out = fn(params)
    if monkeypatch is not None:
        monkeypatch.undo()
    return out, hlo


@pytest.mark.slow
@needs_kernel
def test_an_fp32_model_on_one_device_uses_the_kernel_and_nothing_else_does(monkeypatch):
    """Every layer of a tiny fp32 decoder (global and sliding-window) runs through the kernel on one device, with
    the same loss and gradients as the XLA paths; two devices, bf16, or rows not a multiple of 64 take XLA's."""
    cfg = sizes.model_config("17m").replace(num_layers=3, vocab_size=300, hidden_size=64, intermediate_size=96,
                                            num_heads=2, local_window=32, decoder_window=40)
    one = jax.devices()[:1]
    (loss, grads), hlo = _loss_and_hlo(cfg, 128, one)
    assert hlo.count(cpu_attention.FORWARD) == 3
    (ref_loss, ref_grads), ref_hlo = _loss_and_hlo(cfg, 128, one, native=False, monkeypatch=monkeypatch)
    assert cpu_attention.FORWARD not in ref_hlo
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-9, rtol=0)
    assert cpu_attention.FORWARD not in _loss_and_hlo(cfg, 128, jax.devices()[:2])[1]
    assert cpu_attention.FORWARD not in _loss_and_hlo(cfg.replace(dtype="bfloat16"), 128, one)[1]
    assert cpu_attention.FORWARD not in _loss_and_hlo(cfg, 100, one)[1]
