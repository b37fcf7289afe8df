"""The native fused cross-entropy (ettin_jax/kernels/cpu/fused_ce.py): equal to the XLA path, used only where it applies."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import kernels, model, objectives, sizes
from ettin_jax.kernels.cpu import dots as cpu_dots
from ettin_jax.kernels.cpu import fused_ce

needs_kernel = pytest.mark.skipif("avx512f" not in cpu_dots.cpu_flags(), reason="the native CE needs AVX-512")
V, H = 1000, 128  # V: tails of every tile (1000 = 3 * 288 + 136; 136 = 11 * 12 + 4 = 22 * 6 + 4)


@pytest.fixture
def one_device():
    """A one-device mesh: the tests simulate 8 CPU devices, and the native path is for one."""
    with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
        yield


def _inputs(n, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (n, H))
    emb = jax.random.normal(k[1], (V, H)) * 0.3
    bias = jax.random.normal(k[2], (V,)) * 0.1
    labels = jax.random.randint(k[3], (n,), 0, V)
    weights = (jax.random.uniform(k[4], (n,)) < 0.7).astype(jnp.float32) * 1.5
    return x, emb, bias, labels, weights


def _grads(x, emb, bias, labels, weights, native: bool, monkeypatch):
    """loss, correct and the gradients (x, emb, bias, weights) of 3 loss + 0.5 correct, compiled, with the HLO."""
    if not native:
        monkeypatch.setattr(fused_ce, "usable", lambda *a: False)

    def f(x, emb, bias, weights):
        loss, correct, _ = kernels.decoder_cross_entropy(x, emb, bias, labels, weights, chunk=64)
        return 3.0 * loss + 0.5 * correct, (loss, correct)

    fn = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    hlo = fn.lower(x, emb, bias, weights).as_text()
    grads, (loss, correct) = fn(x, emb, bias, weights)
    monkeypatch.undo()
    return loss, correct, grads, hlo


@needs_kernel
@pytest.mark.parametrize("n", [77, 600])  # padded to 96 (one row block) / 608 (blocks of 512 and 96)
def test_native_path_equals_the_xla_path(n, one_device, monkeypatch):
    x, emb, bias, labels, weights = _inputs(n)
    labels = labels.at[3].set(labels[5])  # two rows with one label: its one-hot terms add up
    loss, correct, grads, hlo = _grads(x, emb, bias, labels, weights, True, monkeypatch)
    ref_loss, ref_correct, ref_grads, ref_hlo = _grads(x, emb, bias, labels, weights, False, monkeypatch)
    assert fused_ce.TARGET in hlo and fused_ce.TARGET not in ref_hlo
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    assert float(correct) == float(ref_correct)
    for name, a, b in zip(("dx", "d_emb", "d_bias", "d_weights"), grads, ref_grads):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, atol=2e-6 * scale, rtol=0, err_msg=name)


@needs_kernel
def test_correct_counts_a_label_that_reaches_the_max(one_device, monkeypatch):
    """`correct` is [label's logit >= the row's max]: rows built so that their label wins or loses."""
    x, emb, bias, labels, weights = _inputs(64, seed=1)
    logits = x @ emb.T + bias
    labels = jnp.argmax(logits, -1).at[::2].set(jnp.argmin(logits[::2], -1))  # odd rows right, even rows wrong
    weights = jnp.ones_like(weights)
    loss, correct, _, _ = _grads(x, emb, bias, labels, weights, True, monkeypatch)
    assert float(correct) == 32.0


@needs_kernel
def test_out_of_range_labels_and_non_finite_features_behave_as_the_xla_path(one_device, monkeypatch):
    """A label past the vocabulary reads the last logit and adds no one-hot term (as XLA's clamped gather and
    dropped scatter do); a NaN in a row's features or in the bias makes the loss and the same gradients NaN in both
    paths."""
    x, emb, bias, labels, weights = _inputs(40, seed=2)
    labels = labels.at[7].set(V + 3)
    got = _grads(x, emb, bias, labels, weights, True, monkeypatch)
    ref = _grads(x, emb, bias, labels, weights, False, monkeypatch)
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-6)
    for a, b in zip(got[2], ref[2]):
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.max(jnp.abs(b))), rtol=0)

    for args in ((x.at[11, 5].set(jnp.nan), emb, bias), (x, emb, bias.at[600].set(jnp.nan))):
        got = _grads(*args, labels, weights, True, monkeypatch)
        ref = _grads(*args, labels, weights, False, monkeypatch)
        assert np.isnan(got[0]) and np.isnan(ref[0])
        for a, b in zip(got[2], ref[2]):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.isnan(got[2][1]).all()  # every embedding row's gradient reads the NaN logits


def _loss_hlo(cfg, objective, mesh_devices):
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 5, cfg.vocab_size)
    batch = dict(tokens=tokens, segment_ids=jnp.ones_like(tokens), positions=jnp.broadcast_to(jnp.arange(64), (2, 64)),
                 mlm_inputs=tokens, mlm_positions=jnp.tile(jnp.arange(0, 64, 4), (2, 1)),
                 mlm_labels=tokens[:, ::4], mlm_weights=jnp.ones((2, 16)))
    m = model.Ettin(cfg)
    fn = jax.jit(jax.grad(lambda p: objectives.loss_fn(p, batch, model=m, objective=objectives.get_objective(objective),
                                                       chunk=64)[0]))
    mesh = jax.make_mesh((len(mesh_devices),), ("data",), devices=mesh_devices)
    with jax.set_mesh(mesh):
        return fn.lower(params).as_text()


@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_an_fp32_train_step_on_one_device_uses_the_kernel_and_nothing_else_does(objective):
    cfg = sizes.model_config("17m").replace(num_layers=1, vocab_size=300, hidden_size=64, intermediate_size=96,
                                            num_heads=2)
    assert fused_ce.TARGET in _loss_hlo(cfg, objective, jax.devices()[:1])
    assert fused_ce.TARGET not in _loss_hlo(cfg, objective, jax.devices()[:2])  # a mesh of two devices
    assert fused_ce.TARGET not in _loss_hlo(cfg.replace(dtype="bfloat16"), objective, jax.devices()[:1])
    assert fused_ce.TARGET not in _loss_hlo(cfg.replace(hidden_size=96, intermediate_size=96, num_heads=2),
                                            objective, jax.devices()[:1])  # width not a multiple of 64


@pytest.mark.slow
def test_training_runs_without_the_kernels(tmp_path):
    """No compiler, or ETTIN_JAX_NATIVE=0: the native CE, attention, gemm and norm are unavailable and an fp32 train
    step on one device takes the XLA paths (on any CPU, with or without AVX-512)."""
    code = ("import jax, jax.numpy as jnp; from ettin_jax import model, objectives, sizes; "
            "from ettin_jax.kernels.cpu import attention as cpu_attention, gemm as cpu_gemm, norm as cpu_norm, "
            "fused_ce; print('available', fused_ce.available() or cpu_attention.available() or "
            "cpu_gemm.available() or cpu_norm.available());"
            "cfg = sizes.model_config('17m').replace(num_layers=1, vocab_size=300, hidden_size=64, "
            "intermediate_size=96, num_heads=2);"
            "p = model.init_params(cfg, jax.random.key(0)); t = jnp.arange(256).reshape(1, 256) % 290 + 5;"
            "b = dict(tokens=t, segment_ids=jnp.ones_like(t), positions=jnp.arange(256)[None]);"
            "f = jax.jit(jax.value_and_grad(lambda p: objectives.loss_fn(p, b, model=model.Ettin(cfg), "
            "objective=objectives.get_objective('clm'))[0]));"
            "hlo = f.lower(p).as_text(); print('custom call', any(n in hlo for n in (fused_ce.TARGET, "
            "cpu_attention.FORWARD, cpu_gemm.TARGET, cpu_norm.TARGET)));"
            "print('loss', float(f(p)[0]))")

    def run_with(tmp, **env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "JAX_NUM_CPU_DEVICES": "1", "ETTIN_JAX_CACHE": str(tmp), **env})
        assert out.returncode == 0, out.stderr[-2000:]
        assert "available False" in out.stdout and "custom call False" in out.stdout, out.stdout
        assert np.isfinite(float(out.stdout.split("loss ")[1])), out.stdout
        return out.stderr

    log = run_with(tmp_path / "a", CXX=str(tmp_path / "no-such-compiler"))
    if "avx512f" in cpu_dots.cpu_flags():  # elsewhere nothing is built at all
        assert "could not be built" in log
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").iterdir())  # no half-built library left
    run_with(tmp_path / "b", ETTIN_JAX_NATIVE="0")
