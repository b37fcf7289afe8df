"""Sharded training on 8 simulated CPU devices: meshes, bad input, FSDP shard sizes, loss parity, cross-mesh restore.

Loss parity: every mesh trains the same paired model (encoder and decoder on the same batches) on the same data,
and its per-step losses are compared with a 1-device mesh inside the same 8-device process
(`config.mesh.num_devices=1`). Sharding changes only the order of floating-point reductions (per-shard partial sums
all-reduced across devices instead of one sum), so the losses agree to fp32 rounding (measured: ~1e-7 relative over
5 steps at JAX's default CPU matmul precision), well inside the 1e-5 asked.
"""
import importlib.util
import math
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ettin_jax import checkpoint, flops, model, sharding, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import losses, small  # noqa: E402

RTOL = 1e-5
STEPS = 5
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]  # (data, fsdp, tensor)


def config(mesh, steps=STEPS, objective="paired", **kw):
    """The trainer tests' tiny paired model, widened so that tensor=4 divides heads and GLU width."""
    c = small(objective, steps=steps)
    c.model.update(hidden_size=128, num_heads=4, intermediate_size=128)
    c.checkpoint_every_steps = 3
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.mesh.num_devices = math.prod(mesh)
    for key, value in kw.items():
        *path, last = key.split(".")
        target = c
        for p in path:
            target = target[p]
        target[last] = value
    return c


def rel_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def both_losses(workdir):
    return {arch: losses(workdir, f"{arch}/loss") for arch in ("encoder", "decoder")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mesh: workdir} of a 5-step paired run on each mesh, trained once for the module (on demand)."""
    cache = {}

    def get(mesh):
        if mesh not in cache:
            workdir = str(tmp_path_factory.mktemp("x".join(map(str, mesh))))
            with pytest.MonkeyPatch.context() as mp:  # MFU's CPU peak is measured by a 20 s matmul: not needed
                mp.setattr(flops, "peak_flops_per_device", lambda dtype="float32": (1e12, "test"))
                train.train(config(mesh), workdir, log=lambda *_: None)
            cache[mesh] = workdir
        return cache[mesh]
    return get


# ------------------------------------------------------------------------------------------- mesh and bad input


def test_mesh_shape_fills_and_names_the_numbers():
    cfg = lambda **kw: dict(dict(data=1, fsdp=1, tensor=1), **kw)
    assert sharding.mesh_shape(cfg(data=-1), 8) == (8, 1, 1, 1)
    assert sharding.mesh_shape(cfg(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 1, 2)
    assert sharding.mesh_shape(cfg(data=2, fsdp=-1, sequence=2), 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match=r"data=2, fsdp=2, sequence=1, tensor=1\) has 4 devices, but 8"):
        sharding.mesh_shape(cfg(data=2, fsdp=2), 8)
    with pytest.raises(ValueError, match="8 devices are not divisible by the fixed axes' product 3"):
        sharding.mesh_shape(cfg(data=-1, tensor=3), 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape(cfg(data=-1, fsdp=-1), 8)


@pytest.mark.multidevice
def test_mesh_selects_devices():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=2, num_devices=4))
    assert dict(mesh.shape) == dict(data=1, fsdp=2, sequence=1, tensor=2)
    assert list(mesh.devices.flat) == jax.devices()[:4]
    assert sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)).devices.size == 8
    with pytest.raises(ValueError, match="mesh.num_devices=16, but 8 devices exist"):
        sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, num_devices=16))


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh, change, message", [
    ((2, 2, 1), {}, r"has 4 devices, but 8 are available"),
    ((1, 1, 8), {}, r"the tensor axis \(8\) does not divide num_heads \(4\)"),
    ((1, 2, 4), {"model.intermediate_size": 130}, r"the tensor axis \(4\) does not divide intermediate_size "
                                                   r"\(GLU width\) \(130\)"),
    ((4, 2, 1), {"global_batch_size": 12}, r"global_batch_size 12 is not divisible by data x fsdp = 4 x 2 = 8"),
    ((4, 2, 1), {"micro_batch_size": 4}, r"micro_batch_size 4 is not divisible by data x fsdp = 4 x 2 = 8"),
])
def test_bad_mesh_is_refused_before_compilation(tmp_path, monkeypatch, mesh, change, message):
    def not_reached(*a, **k):
        raise AssertionError("the bad mesh got as far as initialising parameters")
    monkeypatch.setattr(train, "init_state", not_reached)
    monkeypatch.setattr(train, "make_train_step", not_reached)
    c = config(mesh, **change)
    c.mesh.num_devices = -1  # all 8: (2, 2, 1) does not fit
    with pytest.raises(ValueError, match=message):
        train.train(c, str(tmp_path), log=lambda *_: None)


@pytest.mark.multidevice
def test_bad_dcn_factorisation_is_refused():
    """8 CPU devices in one process are one slice: asking for 2 (or 3) slices names the numbers."""
    with pytest.raises(ValueError, match=r"ask for 2 slices, but the 8 devices are in 1 process\(es\) \(slices "
                                         r"off TPU\); make the product of the dcn_\* sizes 1"):
        sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_data=2))
    with pytest.raises(ValueError, match=r"ask for 3 slices, which do not divide the 8 devices"):
        sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_fsdp=3))
    with pytest.raises(ValueError, match="must be positive"):
        sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_data=0))


@pytest.mark.multidevice
def test_sharding_rules_override_changes_parameter_shardings():
    """config.sharding_rules is prepended to the defaults: ("embed_out", "tensor") splits head_dense over tensor."""
    kernel = lambda params: params["encoder"]["head_dense"]["kernel"]
    default, _ = _state((1, 2, 4))
    assert kernel(default).sharding.spec == P("fsdp", None)
    override, _ = _state((1, 2, 4), sharding_rules=(("embed_out", "tensor"),))
    assert kernel(override).sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in kernel(override).addressable_shards} == {(128 // 2, 128 // 4)}
    # Everything else is placed as before.
    flat = lambda t: {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
    a, b = flat(default), flat(override)
    assert {k for k in a if a[k] != b[k]} == {"['encoder']['head_dense']['kernel']"}


# ------------------------------------------------------------------------------------------------------ remat


@pytest.mark.slow
def test_remat_dots_gives_the_same_loss_and_gradients():
    """Rematerialisation recomputes, it does not change the function: remat='dots' (matmul outputs saved, the rest
    recomputed) gives remat='none''s loss and gradients. ('full' is covered by the trainer tests.)"""
    policy = "dots"
    cfg = model.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                            local_window=4, attention_impl="xla")
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 128)
    seg = jnp.asarray(np.r_[[1] * 10 + [2] * 14, [1] * 20 + [0] * 4].reshape(2, 24))

    def loss(remat, mask):
        m = model.Ettin(cfg.replace(remat=remat))

        def f(p):
            logits = m.apply({"params": p}, m.apply({"params": p}, tokens, mask=mask, segment_ids=seg),
                              method=model.Ettin.predict)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 3])
        return jax.jit(jax.value_and_grad(f))(params)
    for mask in ("encoder", "decoder"):
        (want, want_g), (got, got_g) = loss("none", mask), loss(policy, mask)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_g)[0], jax.tree_util.tree_leaves(want_g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"{mask} {jax.tree_util.keystr(path)}")
    with pytest.raises(ValueError, match="unknown remat policy 'dot'; expected none, full, dots"):
        loss("dot", "encoder")


# ---------------------------------------------------------------------------------------- the memory table


def _memory_module():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "memory.py")
    spec = importlib.util.spec_from_file_location("ettin_memory_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_memory_table_in_docs_is_what_the_script_prints():
    """docs/scaling.md's per-chip memory table and the 8-chip figures are benchmarks/memory.py's output."""
    memory = _memory_module()
    with open(os.path.join(os.path.dirname(memory.__file__), "..", "docs", "scaling.md")) as f:
        doc = f.read()
    section = doc[doc.index("## Memory per chip, estimated"):]
    section = section[:section.index("\n## ")]
    doc_rows = [l for l in section.splitlines() if l.startswith("|")]
    printed = memory.table(64, "data=1,fsdp=-1,tensor=1", 8192)
    assert doc_rows == [l for l in printed.splitlines() if l.startswith("|")], printed
    assert "`python benchmarks/memory.py`" in section and "v5p-128 (64 chips" in section
    # The 8-chip paragraph: `--chips=8 --mesh=data=1,fsdp=-1`, 1b's state and its totals (none, dots, full).
    row = next(l for l in memory.table(8, "data=1,fsdp=-1", 8192).splitlines() if l.startswith("| 1b |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    state, totals = cells[8], [f"{float(c):.1f}" for c in cells[12:15]]
    assert "`python benchmarks/memory.py --chips=8 --mesh=data=1,fsdp=-1`" in section
    assert f"the 1b state is {state} GiB per chip" in section, (state, section)
    assert f"1b totals {totals[0]} (remat none), {totals[1]} (dots) and {totals[2]} GiB (full)" in section, totals


def test_resuming_on_another_mesh_needs_allow_config_change(tmp_path):
    """The mesh is part of the run's config: a resume on another mesh is refused, naming the fields, unless
    --allow_config_change (what docs/scaling.md says)."""
    checkpoint.write_json(str(tmp_path), "config.json", train.config_to_dict(config((2, 2, 2))))
    with pytest.raises(train.ConfigError, match=r"mesh.data: 2 -> 8; mesh.fsdp: 2 -> 1.*--allow_config_change"):
        train.check_resume_config(str(tmp_path), config((8, 1, 1)), allow_change=False)
    train.check_resume_config(str(tmp_path), config((8, 1, 1)), allow_change=True)
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "scaling.md")) as f:
        doc = " ".join(f.read().split())
    assert ("resuming a workdir with a different `config.mesh` is refused (the trainer names the changed `mesh.*` "
            "fields) unless you pass `--allow_config_change`") in doc


# ------------------------------------------------------------------------------------------------------- FSDP


def _state(mesh, **kw):
    c = config(mesh, objective="mlm", **kw)
    models = train.model_configs(c)
    m = sharding.make_mesh(c.mesh)
    tx, _ = train.make_optimizer(c)
    with jax.set_mesh(m):
        return train.init_state(models, c, m, tx, sharding.rules(c), log=lambda *_: None)


def _bytes_per_device(tree):
    per = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return per


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("mesh, shards", [((1, 8, 1), 8), ((2, 2, 2), 4), ((1, 2, 4), 8)])
def test_fsdp_and_tensor_parallelism_really_shard(mesh, shards):
    """Each device holds ~1/shards of the parameters and of the optimizer state (shards = fsdp x tensor)."""
    params, opt_state = _state(mesh)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    per = _bytes_per_device(params)
    assert len(per) == 8
    # Every matrix is split `shards` ways except head_dense [embed, embed_out] (the rules leave embed_out
    # unsharded); vectors carry one logical axis (LayerNorm scales: embed -> fsdp; decoder_bias: vocab -> tensor)
    # and so are split fewer ways. Together under 5% of this tiny model's bytes.
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    unsplit = [jax.tree_util.keystr(p) for p, x in flat
               if len({str(s.index) for s in x.addressable_shards}) < shards and x.ndim > 1]
    assert all("head_dense" in k for k in unsplit), unsplit
    for d, n in per.items():
        assert total / shards <= n <= 1.05 * total / shards, (d, n, total, shards)
    # The embedding, the largest leaf, is split into exactly `shards` distinct pieces.
    emb = params["encoder"]["tok_embeddings"]["embedding"]  # [vocab, embed]: vocab over tensor, embed over fsdp
    _, fsdp, tensor = mesh
    assert {s.data.shape for s in emb.addressable_shards} == {(8192 // tensor, 128 // fsdp)}
    assert len({str(s.index) for s in emb.addressable_shards}) == shards
    opt_total = sum(x.nbytes for x in jax.tree_util.tree_leaves(opt_state))
    for n in _bytes_per_device(opt_state).values():
        assert opt_total / shards <= n <= 1.05 * opt_total / shards


# ------------------------------------------------------------------------------------------- loss parity, restore


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_losses_match_one_device(runs, mesh):
    one = both_losses(runs((1, 1, 1)))
    got = both_losses(runs(mesh))
    for arch in ("encoder", "decoder"):
        assert len(got[arch]) == STEPS
        d = rel_diff(got[arch], one[arch])
        print(f"mesh {mesh} {arch}: max relative loss difference over {STEPS} steps {d:.2e}")
        assert d <= RTOL, (arch, got[arch], one[arch])


@pytest.mark.slow
@pytest.mark.multidevice
def test_checkpoint_saved_on_2x2x2_continues_on_8x1x1(runs, tmp_path):
    src = runs((2, 2, 2))
    work = str(tmp_path / "moved")
    shutil.copytree(src, work)
    shutil.rmtree(os.path.join(work, "checkpoints", str(STEPS)))  # keep step 3, saved on (2, 2, 2)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["3"]
    logs, restored = [], []
    original = checkpoint.Checkpoints.restore_latest

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        restored.append(out[1])
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flops, "peak_flops_per_device", lambda dtype="float32": (1e12, "test"))
        mp.setattr(checkpoint.Checkpoints, "restore_latest", spy)
        train.train(config((8, 1, 1)), work, allow_config_change=True, log=logs.append)
    # The state was read straight onto the new mesh's shardings (pure data parallel: every leaf whole on every
    # device), not onto the (2, 2, 2) layout it was saved from.
    (state,) = restored
    for tree in (state["params"], state["opt_state"]):
        for x in jax.tree_util.tree_leaves(tree):
            assert dict(x.sharding.mesh.shape) == dict(data=8, fsdp=1, sequence=1, tensor=1)
            assert x.sharding.is_fully_replicated, x.sharding
    assert any(str(l).startswith("resumed from step 3") for l in logs), logs
    assert any("mesh {'data': 8, 'fsdp': 1, 'sequence': 1, 'tensor': 1}" in str(l) for l in logs), logs
    want, got = both_losses(src), both_losses(work)
    for arch in ("encoder", "decoder"):
        assert sorted(got[arch]) == list(range(1, STEPS + 1))
        assert {s: got[arch][s] for s in (1, 2, 3)} == {s: want[arch][s] for s in (1, 2, 3)}  # kept lines
        d = rel_diff({s: got[arch][s] for s in (4, 5)}, {s: want[arch][s] for s in (4, 5)})
        print(f"{arch}: steps 4-5 after restoring (2,2,2) -> (8,1,1): max relative difference {d:.2e}")
        assert d <= RTOL
