"""Every attention path equals `reference_attention` (fp32, 1e-5) for every mask kind, window and segment layout.

Paths: the tiled core (CPU: every layer, in cache-sized tiles, with a flash-style backward), blocked (sliding
windows, through the tiled core), chunked (causal query chunks, through the tiled core), the cuDNN
path's arguments (run through jax.nn.dot_product_attention's XLA implementation, which reads them the same way;
cuDNN itself needs a GPU), and TPU splash attention in Pallas interpret mode (slow on CPU: marked slow but one).
"""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import attention
from ettin_jax import kernels
from ettin_jax.kernels import cudnn, splash, xla_attention

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
@pytest.mark.parametrize("t,block", [(100, 16), (96, 32), (100, 96)])  # (100, 96): rows shorter than a window
@pytest.mark.parametrize("windowed", [True, False], ids=["windowed", "neighbour-blocks"])
def test_blocked_equals_reference(band, layout, t, block, windowed):
    """windowed: the CPU path (key windows sliced in a loop); neighbour-blocks: the GPU path (one batched product)."""
    q, k, v = qkv(t)
    seg = jnp.asarray(layouts(t)[layout])
    got = jax.jit(xla_attention.blocked_attention, static_argnames=("band", "block", "windowed"))(
        q, k, v, segment_ids=seg, band=BANDS[band], block=block, windowed=windowed)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)


@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("layout", ["one", "padded", "packed"])
@pytest.mark.parametrize("tile_bytes", [xla_attention.TILE_BYTES, 4 * 8 * 100])
def test_chunked_equals_reference(band, layout, tile_bytes):
    t = 100
    q, k, v = qkv(t, seed=1)
    seg = jnp.asarray(layouts(t)[layout])
    got = jax.jit(xla_attention.chunked_attention, static_argnames=("band", "chunk", "tile_bytes"))(
        q, k, v, segment_ids=seg, band=BANDS[band], chunk=32, tile_bytes=tile_bytes)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)


def test_tile_budget():
    """A given budget is used as it is; the CPU default is TILE_BYTES, widened for long rows so that a query tile
    has at least MIN_TILE_QUERIES queries."""
    assert xla_attention.tile_budget(1234, row_keys=8192) == 1234
    assert xla_attention.tile_budget() == xla_attention.TILE_BYTES
    assert xla_attention.tile_budget(row_keys=1024) == xla_attention.TILE_BYTES
    assert xla_attention.tile_budget(row_keys=8192) == xla_attention.MIN_TILE_QUERIES * 8192 * 4


# Tile budgets that force every shape of the tiled core: whole rows many at a time, one row at a time, and query
# tiles of 8 rows (100 queries: the last tile padded) against all keys.
TILES = {"rows": xla_attention.TILE_BYTES, "one-row": 4 * 100 * 100, "query-tiles": 4 * 8 * 100}


@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("layout,tiles", [
    pytest.param(layout, tiles, marks=() if layout == "packed" or tiles == "rows" else pytest.mark.slow)
    for layout in ("one", "padded", "packed") for tiles in TILES])
def test_tiled_equals_reference(band, layout, tiles):
    """Forward and gradients of the tiled core (the CPU path of every layer) equal the dense reference."""
    t = 100
    q, k, v = qkv(t, seed=6)
    seg = jnp.asarray(layouts(t)[layout])
    f = lambda q, k, v: xla_attention.tiled_attention(q, k, v, q_seg=seg, k_seg=seg, band=BANDS[band],
                                                  tile_bytes=TILES[tiles])
    r = lambda q, k, v: attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=BANDS[band])
    np.testing.assert_allclose(jax.jit(f)(q, k, v), jax.jit(r)(q, k, v), atol=1e-5)
    w = jax.random.normal(jax.random.key(9), q.shape)
    loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))
    for a, b in zip(loss(f)(q, k, v), loss(r)(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_tiled_cross_attention_with_indices_and_missing_keys():
    """Queries against a longer key range measured in their own indices (as a KV cache is), keys marked missing
    (segment -1) and rows that see no key at all: the same as the reference, forward and gradients."""
    k_ = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(k_[0], (2, 24, 2, 8))
    k, v = (jax.random.normal(x, (2, 40, 2, 8)) for x in k_[1:])
    q_seg = jnp.asarray(np.r_[np.ones(20), np.full(4, 5)][None].repeat(2, 0), jnp.int32)  # segment 5: no keys
    k_seg = jnp.asarray(np.r_[np.ones(30), np.full(10, -1)][None].repeat(2, 0), jnp.int32)
    q_idx = jnp.broadcast_to(16 + jnp.arange(24), (2, 24))
    k_idx = jnp.broadcast_to(jnp.arange(40), (2, 40))
    for band in [(None, 0), (6, 0), (None, None)]:
        kw = dict(q_seg=q_seg, k_seg=k_seg, band=band, q_idx=q_idx, k_idx=k_idx)
        f = lambda q, k, v: xla_attention.tiled_attention(q, k, v, tile_bytes=4 * 8 * 40, **kw)
        r = lambda q, k, v: attention.reference_attention(q, k, v, **kw)
        np.testing.assert_allclose(f(q, k, v), r(q, k, v), atol=1e-5)
        w = jax.random.normal(jax.random.key(3), q.shape)
        loss = lambda fn: jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2))
        for a, b in zip(loss(f)(q, k, v), loss(r)(q, k, v)):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("tq", [1, 5])
@pytest.mark.parametrize("band", [(None, 0), (6, 0), (None, None)])
def test_cached_attention_equals_reference(tq, band):
    """The KV-cache path (cache [B * H, S, D]) is `reference_attention` over the same keys in [B, S, H, D]: rows of
    different batch entries see different keys (so a wrong B * H order would show), unwritten slots are -1."""
    b, s, h, d = 3, 40, 4, 8
    k_ = jax.random.split(jax.random.key(12), 3)
    q = jax.random.normal(k_[0], (b, tq, h, d))
    k, v = (jax.random.normal(x, (b, s, h, d)) for x in k_[1:])
    start = 20
    k_seg = jnp.asarray(np.r_[np.ones(start + tq), np.full(s - start - tq, -1)][None].repeat(b, 0), jnp.int32)
    k_seg = k_seg.at[1, :7].set(0).at[2, :start:2].set(0)  # rows 1 and 2 lose different keys
    kw = dict(q_seg=jnp.ones((b, tq), jnp.int32), k_seg=k_seg, band=band,
              q_idx=jnp.broadcast_to(start + jnp.arange(tq), (b, tq)), k_idx=jnp.broadcast_to(jnp.arange(s), (b, s)))
    heads_major = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * h, s, d)
    got = jax.jit(functools.partial(attention.cached_attention, **kw))(q, heads_major(k), heads_major(v))
    np.testing.assert_allclose(got, attention.reference_attention(q, k, v, **kw), atol=1e-5)


@pytest.mark.parametrize("impl,band,block", [("blocked", "encoder-local", 16), ("blocked", "decoder-local-hf", 16),
                                             ("blocked", "encoder-local", 64), ("blocked", "asymmetric", 64),
                                             ("neighbour-blocks", "encoder-local", 16),
                                             ("neighbour-blocks", "decoder-local-hf", 16),
                                             ("chunked", "decoder-global", None), ("chunked", "encoder-global", None)])
def test_gradients_equal_reference(impl, band, block):
    """block 64 at t = 80: rows shorter than a window (block + reach), the padded-window path."""
    t = 80
    q, k, v = qkv(t, seed=2)
    seg = jnp.asarray(layouts(t)["packed"])
    if impl in ("blocked", "neighbour-blocks"):
        f = lambda q, k, v: xla_attention.blocked_attention(q, k, v, segment_ids=seg, band=BANDS[band], block=block,
                                                        windowed=impl == "blocked")
    else:
        f = lambda q, k, v: xla_attention.chunked_attention(q, k, v, segment_ids=seg, band=BANDS[band], chunk=32,
                                                        tile_bytes=4 * 8 * 80)
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
    args = cudnn.cudnn_arguments(seg, BANDS[band])
    if band in ("encoder-local", "asymmetric"):  # a right window: cuDNN cannot, the dispatcher goes blocked
        assert args is None
        assert kernels.resolve_impl("cudnn", BANDS[band], 1024) == "blocked"
        assert kernels.resolve_impl("auto", BANDS[band], 1024, target="gpu") == "blocked"
        return
    if BANDS[band] == (None, 0) or BANDS[band][1] == 0:
        assert args["is_causal"]
    if BANDS[band][0] is not None:
        assert args["local_window_size"] == (BANDS[band][0], 0)
    got = jax.nn.dot_product_attention(q, k, v, implementation="xla", **args)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)
    assert kernels.resolve_impl("auto", BANDS[band], 1024, target="gpu") == "cudnn"


@pytest.mark.slow
def test_dispatch():
    assert kernels.resolve_impl("auto", (64, 64), 1024, target="cpu") == "blocked"
    assert kernels.resolve_impl("auto", (64, 64), 100, target="cpu") == "chunked"
    assert kernels.resolve_impl("auto", (None, 0), 1024, target="cpu") == "chunked"
    assert kernels.resolve_impl("auto", (None, None), 1024, target="tpu") == "splash"
    assert kernels.resolve_impl("auto", (64, 64), 1000, target="tpu") == "splash"  # any length: padded inside
    with pytest.raises(ValueError, match="unknown attention implementation 'flash3'"):
        kernels.resolve_impl("flash3", (None, None), 8)
    t = 100
    q, k, v = qkv(t, seed=4)
    seg = jnp.asarray(layouts(t)["packed"])
    for band in BANDS.values():
        ref = reference(q, k, v, seg, band)
        for impl in ("auto", "xla", "blocked", "chunked"):
            got = kernels.self_attention(q, k, v, segment_ids=seg, band=band, impl=impl, block=16)
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
    got = jax.jit(lambda q, k, v, s: splash.splash_attention(
        q, k, v, segment_ids=s, band=BANDS[band], block=128, interpret=True))(q, k, v, seg)
    np.testing.assert_allclose(got, reference(q, k, v, seg, BANDS[band]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("band", ["encoder-local", "decoder-global"])
def test_splash_interpret_gradients_equal_reference(band):
    t = 256
    q, k, v = qkv(t, seed=6, d=64)
    seg = jnp.asarray(layouts(t)["packed"])
    w = jax.random.normal(jax.random.key(9), q.shape)
    f = lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg, band=BANDS[band], block=128,
                                                   interpret=True)
    r = lambda q, k, v: attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=BANDS[band])
    loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))
    for a, b in zip(loss(f)(q, k, v), loss(r)(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("band", ["encoder-local", "decoder-global"])
def test_splash_pads_rows_of_any_length(band):
    """Rows whose length is no multiple of 128 (Ettin's long context is 7999) run padded inside the kernel: output
    and gradients equal the reference at T = 200 (padded to 256), and nothing is padded at T = 256."""
    assert splash.padded_length(7999, 512) == 8192 and splash.padded_length(7999, 128) == 8064
    assert splash.padded_length(200, 512) == 256 and splash.padded_length(256, 128) == 256
    t = 200
    q, k, v = qkv(t, seed=7, d=64)
    seg = jnp.asarray(layouts(t)["packed"])
    w = jax.random.normal(jax.random.key(3), q.shape)
    f = lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg, band=BANDS[band], block=128,
                                                interpret=True)
    r = lambda q, k, v: attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=BANDS[band])
    np.testing.assert_allclose(jax.jit(f)(q, k, v), r(q, k, v), atol=1e-5)
    loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))
    for a, b in zip(loss(f)(q, k, v), loss(r)(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------- splash on a device mesh

SPLASH_MESHES = [(2, 2, 2), (1, 2, 4)]  # (data, fsdp, tensor)


def _mesh(shape):
    from ettin_jax import sharding
    data, fsdp, tensor = shape
    return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


def _mesh_context(mesh):
    """What the trainer sets while it traces the step: the mesh and the logical-axis rules."""
    import contextlib
    import flax.linen as nn
    from ettin_jax import sharding
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.DEFAULT_RULES))
    return stack


def _sharded_inputs(mesh, t=256, h=4, d=64, seed=7):
    """4 rows (packed and padded documents), 4 heads, placed as the model's activations are."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(x, (4, t, h, d)) for x in keys)
    lay = layouts(t)
    seg = jnp.asarray(np.concatenate([lay["packed"], lay["padded"]]))
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, act) for x in (q, k, v))
    return q, k, v, jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"))))


def _shard_maps(jaxpr):
    """The shard_map equations of a jaxpr, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            out.append(eqn)
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    out.extend(_shard_maps(sub))
    return out


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape", SPLASH_MESHES, ids=lambda m: "x".join(map(str, m)))
@pytest.mark.parametrize("band", [
    pytest.param("encoder-local"), pytest.param("encoder-global", marks=pytest.mark.slow),
    pytest.param("decoder-global", marks=pytest.mark.slow), pytest.param("decoder-local-hf", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_splash_sharded_equals_reference(mesh_shape, band):
    """On a (data, fsdp, tensor) mesh splash runs in a shard_map over batch and heads, and equals the reference,
    forward and gradients."""
    mesh = _mesh(mesh_shape)
    q, k, v, seg = _sharded_inputs(mesh)
    w = jax.random.normal(jax.random.key(9), q.shape)
    f = lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg, band=BANDS[band], block=128,
                                                   interpret=True)
    r = lambda q, k, v: attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=BANDS[band])
    grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))
    with _mesh_context(mesh):
        (sm,) = _shard_maps(jax.make_jaxpr(f)(q, k, v).jaxpr)
        data, fsdp, tensor = mesh_shape
        batch = tuple(a for a, n in (("data", data), ("fsdp", fsdp)) if n > 1)
        *consts, qs, ks, vs, ss = sm.params["in_specs"]  # the kernel's mask tables come first, replicated
        assert qs == ks == vs == jax.P(batch, None, "tensor", None), sm.params["in_specs"]
        assert ss == jax.P(batch, None) and all(c == jax.P() for c in consts), sm.params["in_specs"]
        got, want = jax.jit(f)(q, k, v), jax.jit(r)(q, k, v)
        got_g, want_g = grad(f)(q, k, v), grad(r)(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape", SPLASH_MESHES, ids=lambda m: "x".join(map(str, m)))
def test_splash_on_a_mesh_lowers_for_tpu(mesh_shape):
    """The real (Mosaic) kernel, lowered for TPU from this CPU host: partitioned by GSPMD it cannot be (XLA raises
    "Mosaic kernels cannot be automatically partitioned"); inside splash_attention's shard_map it lowers, forward
    and backward."""
    mesh = _mesh(mesh_shape)
    q, k, v, seg = _sharded_inputs(mesh, d=128)
    tpu = lambda fn, *a: jax.jit(fn).trace(*a).lower(lowering_platforms=("tpu",))
    bare = functools.partial(splash._splash_local, band=(W, W), block=128, interpret=False)
    with _mesh_context(mesh):
        with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
            tpu(bare, q, k, v, seg)
        for band in ((W, W), (None, 0)):
            f = lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg, band=band, interpret=False)
            tpu(f, q, k, v)
            tpu(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)), q, k, v)


@pytest.mark.multidevice
def test_splash_sharded_bad_batch_and_sequence_axis():
    """A batch the mesh cannot split is refused with its numbers; a sequence axis is gathered (rows whole inside
    the kernel), still equal to the reference."""
    from ettin_jax import sharding
    mesh = _mesh((2, 2, 2))
    q, k, v, seg = _sharded_inputs(mesh, t=128)
    with _mesh_context(mesh):
        with pytest.raises(ValueError, match=r"the batch \(2\) is not divisible by the mesh axes \('data', 'fsdp'\) "
                                             r"it is sharded over \(product 4\)"):
            splash.splash_attention(q[:2], k[:2], v[:2], segment_ids=seg[:2], band=(W, W), interpret=True)
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, sequence=2, tensor=2))
    with _mesh_context(mesh):
        f = lambda q, k, v, s: splash.splash_attention(q, k, v, segment_ids=s, band=(W, W), block=128,
                                                          interpret=True)
        (sm,) = _shard_maps(jax.make_jaxpr(f)(q, k, v, seg).jaxpr)
        assert sm.params["in_specs"][-4] == jax.P("fsdp", None, "tensor", None), sm.params["in_specs"]
        got = jax.jit(f)(q, k, v, seg)
    np.testing.assert_allclose(got, reference(q, k, v, seg, (W, W)), atol=1e-5)


def test_splash_on_one_device_has_no_shard_map():
    t = 128
    q, k, v = qkv(t, d=64)
    seg = jnp.asarray(layouts(t)["packed"])
    f = lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg, band=(W, W), interpret=True)
    assert _shard_maps(jax.make_jaxpr(f)(q, k, v).jaxpr) == []


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.parametrize("mask", ["encoder", "decoder"])
def test_model_with_splash_on_a_mesh_equals_xla(mask):
    """The mesh reaches the op through the model (which names no device axis): a 2-layer model (one global, one
    local layer) with attention_impl='splash' on a (2, 2, 2) mesh equals 'xla', hidden states and gradients."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ettin_jax import model as model_lib
    cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_layers=2, num_heads=4,
                                local_window=16, attention_impl="splash")
    params = model_lib.init_params(cfg.replace(attention_impl="xla"), jax.random.key(0))  # init runs 8 tokens
    mesh = _mesh((2, 2, 2))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    tokens = jax.device_put(jax.random.randint(jax.random.key(1), (4, 128), 0, 256), rows)
    lay = layouts(128)
    seg = jax.device_put(jnp.asarray(np.concatenate([lay["packed"], lay["padded"]])), rows)
    w = jax.random.normal(jax.random.key(2), (4, 128, 128))

    def loss(impl):
        m = model_lib.Ettin(cfg.replace(attention_impl=impl))
        return lambda p: jnp.sum(w * m.apply({"params": p}, tokens, mask=mask, segment_ids=seg))
    with _mesh_context(mesh):
        (sm,) = _shard_maps(jax.make_jaxpr(loss("splash"))(params).jaxpr)[:1]
        assert sm.params["in_specs"][-4] == P(("data", "fsdp"), None, "tensor", None)
        (got, got_g), (want, want_g) = (jax.jit(jax.value_and_grad(loss(i)))(params) for i in ("splash", "xla"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_g)[0], jax.tree_util.tree_leaves(want_g)):
        # Gradients of sum(w * hidden) reach ~200 here: fp32 rounding, relative to the leaf's scale.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))
