"""The screened argmax (greedy decoding's tied decoder on CPU) returns the exact fp32 argmax of h . e_i + bias_i."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax.kernels.cpu import build as native_build
from ettin_jax.kernels.cpu import screened_argmax

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler (g++) to build the handler")


def _exact(h, emb, bias):
    """The fp32 logits' argmax from float64 logits rounded to fp32 (what any fp32 product gives, up to ties)."""
    logits = (np.asarray(emb, np.float64) @ np.asarray(h, np.float64)).astype(np.float32) + np.asarray(bias)
    return int(np.argmax(logits))


@pytest.fixture(scope="module")
def run():
    assert screened_argmax.available(), "the handler did not build: see the logged compiler error"
    prepare = jax.jit(screened_argmax.prepare)
    call = jax.jit(screened_argmax.argmax)
    return lambda h, emb, bias: call(h, emb, bias, prepare(emb))


def test_prepare_is_the_bf16_copy_and_its_row_norms():
    emb = jax.random.normal(jax.random.key(0), (1500, 100)) * 0.02
    screen = jax.jit(screened_argmax.prepare)(emb)
    low = emb.astype(jnp.bfloat16)
    assert screen["low"].dtype == jnp.bfloat16 and bool((screen["low"] == low).all())
    np.testing.assert_allclose(screen["norm"], np.linalg.norm(np.asarray(emb, np.float64), axis=-1), rtol=2e-6)
    err = np.linalg.norm(np.asarray(emb, np.float64) - np.asarray(low.astype(jnp.float32), np.float64), axis=-1)
    assert (np.asarray(screen["err"]) >= err * (1 - 1e-7)).all()  # rounded up: the bound stays a bound
    np.testing.assert_allclose(screen["err"], err, rtol=2e-6)


@pytest.mark.parametrize("vocab,width", [(5000, 768), (2049, 100), (50368, 256)])
def test_equals_the_fp32_argmax_on_random_rows(run, vocab, width):
    """Shapes with a partial last chunk of rows and a width off the 64-wide vector loop; scales from small to large."""
    k = jax.random.split(jax.random.key(vocab + width), 3)
    emb = jax.random.normal(k[0], (vocab, width)) * 0.02
    bias = jax.random.normal(k[1], (vocab,)) * 0.01
    for i in range(25):
        h = jax.random.normal(jax.random.fold_in(k[2], i), (width,)) * 10.0 ** (i % 5 - 2)
        token, candidates = run(h, emb, bias)
        assert int(token) == _exact(h, emb, bias)
        assert 1 <= int(candidates) < vocab // 10  # the screen recomputes a few rows, not the vocabulary


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


def _check_near_ties(run, make):
    """40 draws of (h, emb) from `make`; the screened argmax must equal the exact one every time, while the bf16
    scores alone must pick another row in at least 10 (so the draws do test the bound)."""
    bf16_wrong = 0
    for i in range(40):
        h, emb = make(np.random.default_rng(i))
        bias = np.zeros(len(emb), np.float32)
        want = _exact(h, emb, bias)
        bf16_wrong += int(np.argmax(_bf16(emb).astype(np.float64) @ _bf16(h).astype(np.float64))) != want
        token, candidates = run(jnp.asarray(h), jnp.asarray(emb), jnp.asarray(bias))
        assert int(token) == want, i
        assert int(candidates) >= 2
    assert bf16_wrong >= 10, bf16_wrong


def test_near_ties_the_rows_rounding_ranks_wrongly(run):
    """h exact in bf16, rows in clusters of near-duplicates (5e-6 apart): only the rows' rounding errs, so only
    the ||e_i - bf16(e_i)|| term of the bound keeps the right row."""
    def make(rng):
        centres = rng.normal(size=(200, 256)) * 0.05
        emb = (np.repeat(centres, 16, axis=0) + rng.normal(size=(3200, 256)) * 5e-6).astype(np.float32)
        return _bf16(rng.normal(size=256)), emb
    _check_near_ties(run, make)


def test_near_ties_the_features_rounding_ranks_wrongly(run):
    """Rows exact in bf16 whose logits are all equal before rounding (noise orthogonal to h): only h's rounding
    errs, so only the ||h - bf16(h)|| term of the bound keeps the right row."""
    def make(rng):
        h = rng.normal(size=256).astype(np.float32)
        u = h / np.linalg.norm(h)
        z = rng.normal(size=(3000, 256)) * 0.05
        z -= np.outer(z @ u, u)
        return h, _bf16(0.05 * u + z)
    _check_near_ties(run, make)


def test_bias_decides_between_equal_rows_and_first_of_equals_wins(run):
    emb = jnp.tile(jax.random.normal(jax.random.key(3), (1, 64)), (3000, 1))
    h = jax.random.normal(jax.random.key(4), (64,))
    assert int(run(h, emb, jnp.zeros((3000,)))[0]) == 0  # all logits equal: the first, as argmax
    bias = jnp.zeros((3000,)).at[2345].set(1e-6)
    assert int(run(h, emb, bias)[0]) == 2345


def test_values_that_are_not_finite_give_minus_one(run):
    """NaN or inf in the features, the embedding or the bias: -1, and the caller's plain product decides (as
    jnp.argmax does for NaN logits)."""
    emb, bias, h = jax.random.normal(jax.random.key(0), (3000, 64)), jnp.zeros((3000,)), jnp.ones((64,))
    for bad in (jnp.nan, jnp.inf):
        for args in ((h.at[5].set(bad), emb, bias), (h, emb.at[2100, 7].set(bad), bias), (h, emb, bias.at[9].set(bad))):
            assert [int(x) for x in run(*args)] == [-1, -1]


@pytest.mark.slow
def test_a_failed_build_falls_back(tmp_path):
    """No compiler: `available()` is False with the reason logged, nothing is left in the cache, and greedy
    generation still runs (plain product); a damaged cached library likewise; ETTIN_JAX_NATIVE=0 turns it off."""
    code = ("import jax; from ettin_jax import inference, model, sizes; "
            "from ettin_jax.kernels.cpu import screened_argmax;"
            "print('available', screened_argmax.available());"
            "cfg = sizes.model_config('17m').replace(num_layers=2, vocab_size=512);"
            "p = model.init_params(cfg, jax.random.key(0));"
            "print('tokens', len(inference.generate(p, cfg, [1, 5, 6], 4)))")
    def run_with(cache, **env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ETTIN_JAX_CACHE": str(cache), **env})
        assert out.returncode == 0, out.stderr[-2000:]
        assert "available False" in out.stdout and "tokens 4" in out.stdout, out.stdout
        return out.stderr

    assert "could not be built" in run_with(tmp_path / "a", CXX=str(tmp_path / "no-such-compiler"))
    assert not list((tmp_path / "a").iterdir())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / os.path.basename(native_build.build("screened_argmax"))).write_bytes(b"not a library")
    assert "delete it to rebuild" in run_with(tmp_path / "b")
    run_with(tmp_path / "c", ETTIN_JAX_NATIVE="0")
