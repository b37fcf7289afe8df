"""bf16 products on CPU (`cpu_dots`): exact transposes, the projection and its gradients equal the fp32 computation
on the same bf16 operands, every product of a bf16 train step runs in bf16 (none upcast), and the model and the
fused cross-entropy give the same values and gradients with and without them."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import kernels, model, objectives, sizes
from ettin_jax.kernels.cpu import dots as cpu_dots

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's bf16 products")

BF16 = jnp.bfloat16


@pytest.fixture
def cpu_dots_on(monkeypatch):
    """The model's bf16 products through cpu_dots whatever this CPU's instruction set (CI's may lack bf16 units;
    the products are the same, only slower)."""
    monkeypatch.setattr(cpu_dots, "cpu_has_bf16_units", lambda: True)


@pytest.mark.parametrize("text,has", [
    ("flags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
    ("model name\t: some bf16 marketing name\nflags\t\t: fpu avx2\n", False),
])
def test_cpu_has_bf16_units_reads_the_flags(tmp_path, text, has):
    (tmp_path / "cpuinfo").write_text(text)
    assert cpu_dots.cpu_has_bf16_units(str(tmp_path / "cpuinfo")) is has
    assert cpu_dots.cpu_has_bf16_units(str(tmp_path / "missing")) is False


def test_enabled_only_for_bf16_on_a_cpu_with_bf16_units(monkeypatch):
    monkeypatch.setattr(cpu_dots, "cpu_has_bf16_units", lambda: True)
    assert cpu_dots.enabled("bfloat16") and cpu_dots.enabled(BF16)
    assert not cpu_dots.enabled("float32")
    monkeypatch.setattr(cpu_dots, "cpu_has_bf16_units", lambda: False)
    assert not cpu_dots.enabled("bfloat16")


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("shape", [(8, 16), (37, 5), (1, 9), (300, 64)])
def test_transposed_is_exact(shape):
    x = jax.random.normal(jax.random.key(0), shape).astype(BF16) * 1e3
    got = jax.jit(cpu_dots.transposed)(x)
    assert got.dtype == BF16 and got.shape == shape[::-1]
    np.testing.assert_array_equal(_f32(got), _f32(x).T)


def test_transposed_product_runs_and_is_the_transpose():
    """A bf16 product transposed after the fact is laid out transposed by XLA:CPU and then fails at run time
    ("Unsupported element type for DotThunk::Execute"); `transposed_product` must run and be exact."""
    k = jax.random.split(jax.random.key(2), 2)
    a_t = jax.random.normal(k[0], (24, 40)).astype(BF16)
    b = jax.random.normal(k[1], (40, 56)).astype(BF16)
    got = jax.jit(cpu_dots.transposed_product)(a_t, b)
    assert got.dtype == jnp.float32 and got.shape == (56, 24)
    np.testing.assert_allclose(np.asarray(got), (_f32(a_t) @ _f32(b)).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(48,), (3, 17)])
def test_dense_and_its_gradients_equal_the_fp32_products_of_the_bf16_operands(lead):
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (*lead, 24)).astype(BF16)
    kernel = jax.random.normal(k[1], (24, 40)) * 0.2  # fp32, as the parameters are
    g = jax.random.normal(k[2], (*lead, 40)).astype(BF16)
    y, vjp = jax.vjp(jax.jit(cpu_dots.dense), x, kernel)
    dx, dw = vjp(g)
    assert (y.dtype, dx.dtype, dw.dtype) == (BF16, BF16, jnp.float32)
    xf, kf, gf = _f32(x).reshape(-1, 24), _f32(kernel.astype(BF16)), _f32(g).reshape(-1, 40)
    # bf16 results: the fp32-accumulated value rounded once (one bf16 ulp, 2^-8 relative, of slack for the
    # accumulation order); the weight gradient stays fp32.
    np.testing.assert_allclose(_f32(y).reshape(-1, 40), xf @ kf, rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(_f32(dx).reshape(-1, 24), gf @ kf.T, rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), xf.T @ gf, rtol=1e-5, atol=1e-5)


def _dots(hlo: str) -> list[tuple[str, str, set[str]]]:
    """(op_name, result shape, element types of the operands) of every dot in compiled HLO."""
    out = []
    for body in re.split(r"\n(?=\S)", hlo):
        for m in re.finditer(r"= \w+(\[[^\]]*\])\{[^}]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)([^\n]*)", body):
            types = set()
            for name in m.group(2, 3):
                d = re.search(r"%" + re.escape(name) + r" = (\w+)\[", body)
                types.add(d.group(1) if d else "?")
            op = re.search(r'op_name="([^"]*)"', m.group(4))
            out.append((op.group(1) if op else "", m.group(1), types))
    return out


@pytest.mark.slow
def test_a_bf16_train_step_runs_every_projection_product_in_bf16(cpu_dots_on):
    """The forward product and both gradient products of every projection of a bf16 train step have bf16
    operands. The plain `jnp.dot` fails this: its weight gradients, and every product whose result is bf16, are
    upcast to fp32 and leave YNNPACK."""
    cfg = sizes.model_config("tiny", vocab_size=256, dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(0))
    m = model.Ettin(cfg)
    batch = _batch(cfg)
    step = jax.jit(jax.value_and_grad(
        lambda p: objectives.loss_fn(p, batch, model=m, objective=objectives.get_objective("mlm"), chunk=16)[0]))
    dots = _dots(step.lower(params).compile().as_text())
    proj = [(op, shape, t) for op, shape, t in dots if re.search(r"/(Wqkv|Wo|Wi|head_dense)/", op)]
    assert len(proj) >= 3 * (4 * cfg.num_layers + 1)  # forward, dx and dW (and the transposes' products)
    assert all(t == {"bf16"} for _, _, t in proj), [p for p in proj if p[2] != {"bf16"}]


def test_the_fused_cross_entropy_runs_its_products_in_bf16(cpu_dots_on):
    n, v, h = 70, 300, 16
    x = jnp.ones((n, h), BF16)
    f = jax.jit(jax.grad(lambda x, e, b: kernels.decoder_cross_entropy(
        x, e, b, jnp.zeros((n,), jnp.int32), jnp.ones((n,)), 32)[0], argnums=(0, 1, 2)))
    dots = _dots(f.lower(x, jnp.ones((v, h)), jnp.ones((v,))).compile().as_text())
    products = [d for d in dots if "1," not in d[1]]  # the bias gradient's column sums are an fp32 matrix-vector
    assert len(products) >= 4 and all(t == {"bf16"} for _, _, t in products), dots


def _batch(cfg, b=2, t=32, p=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, cfg.vocab_size, (b, t)).astype(np.int32)
    mlm_pos = np.sort(np.stack([rng.choice(np.arange(1, t), p, replace=False) for _ in range(b)]), 1)
    inputs = tokens.copy()
    np.put_along_axis(inputs, mlm_pos, 4, 1)
    return {k: jnp.asarray(v) for k, v in dict(
        tokens=tokens, segment_ids=np.ones((b, t), np.int32), positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        mlm_inputs=inputs, mlm_positions=mlm_pos.astype(np.int32), mlm_labels=np.take_along_axis(tokens, mlm_pos, 1),
        mlm_weights=np.ones((b, p), np.float32)).items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlm", "clm"])
def test_bf16_loss_and_gradients_equal_the_plain_products(name, monkeypatch, cpu_dots_on):
    cfg = sizes.model_config("tiny", vocab_size=256, dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(0))
    m = model.Ettin(cfg)
    batch = _batch(cfg)
    obj = objectives.get_objective(name)

    def run():
        return jax.jit(jax.value_and_grad(
            lambda p: objectives.loss_fn(p, batch, model=m, objective=obj, chunk=16)[0]))(params)

    (l1, g1) = run()
    monkeypatch.setattr(cpu_dots, "enabled", lambda dtype: False)
    (l2, g2) = run()
    np.testing.assert_allclose(l1, l2, rtol=1e-3)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree_util.tree_leaves(g2)):
        # bf16 activations on both sides, rounded at different points: agreement to a few bf16 ulps of the
        # largest entry (a wrong product, a missing term or a transposed gradient is off by O(1)).
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, atol=0.03 * scale + 1e-7, err_msg=jax.tree_util.keystr(path))


def test_decoder_cross_entropy_bf16_gradients_with_and_without_the_transposed_dE(monkeypatch, cpu_dots_on):
    k = jax.random.split(jax.random.key(3), 4)
    n, v, h = 70, 300, 16
    x = jax.random.normal(k[0], (n, h)).astype(BF16)
    emb = jax.random.normal(k[1], (v, h)) * 0.5
    bias = jax.random.normal(k[2], (v,)) * 0.1
    labels = jax.random.randint(k[3], (n,), 0, v)
    weights = jnp.ones((n,), jnp.float32)
    f = jax.jit(jax.grad(lambda x, e, b: kernels.decoder_cross_entropy(x, e, b, labels, weights, 32)[0],
                         argnums=(0, 1, 2)))
    got = f(x, emb, bias)
    monkeypatch.setattr(cpu_dots, "enabled", lambda dtype: False)
    ref = jax.jit(jax.grad(lambda x, e, b: kernels.decoder_cross_entropy(x, e, b, labels, weights, 32)[0],
                           argnums=(0, 1, 2)))(x, emb, bias)
    assert got[1].shape == emb.shape
    for a, b in zip(got, ref):
        np.testing.assert_allclose(_f32(a), _f32(b), rtol=1e-5, atol=1e-5)
