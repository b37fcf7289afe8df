"""The recipes of docs/architecture.md, each done once: add a size, an objective, an attention kernel."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import attention, kernels, model, objectives, sizes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ettin_config(arg):
    spec = importlib.util.spec_from_file_location("ettin_config", os.path.join(REPO, "configs", "ettin.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_add_a_size(monkeypatch):
    """A size is one row of `sizes.SIZES`: the recipe, the model and the runlocal config pick it up."""
    monkeypatch.setitem(sizes.SIZES, "8m", sizes.Size(6, 128, 256, 2, 2e-3, 1e-4, 1e9, 20e9))
    c = _ettin_config("size=8m,objective=paired,phase=pretrain")
    assert (c.optimizer.peak_lr, c.optimizer.weight_decay, c.schedule.warmup_tokens,
            c.batch_size_warmup.tokens) == (2e-3, 1e-4, 1e9, 20e9)
    cfg = sizes.model_config("8m")
    shapes, _ = model.abstract_params(cfg)
    h, inner, v = 128, 256, cfg.vocab_size
    per_layer = 3 * h * h + h * h + 2 * inner * h + inner * h + 2 * h  # Wqkv, Wo, Wi, Wo, two norms
    expected = v * h + h + 6 * per_layer - h + h + h * h + h + v  # layer 0 has no attn_norm
    assert model.count_params(shapes) == expected


@pytest.mark.slow
def test_add_an_objective(monkeypatch):
    """An objective is one `Objective` entry: here masked tokens predicted from two positions back. `loss_fn` then
    trains it; its loss equals the cross-entropy written out from `Ettin.predict`."""
    obj = objectives.Objective("mntp2", attention.BIDIRECTIONAL, masked_inputs=True, every_position=False,
                               read_offset=-2)
    monkeypatch.setitem(objectives.OBJECTIVES, "mntp2", obj)
    cfg = sizes.model_config("tiny", vocab_size=64)
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 64, (2, 16)).astype(np.int32)
    positions = np.array([[3, 7, 9], [2, 5, 14]], np.int32)
    inputs = tokens.copy()
    np.put_along_axis(inputs, positions, 4, axis=1)
    batch = dict(tokens=jnp.asarray(tokens), mlm_inputs=jnp.asarray(inputs),
                 segment_ids=jnp.ones((2, 16), jnp.int32), positions=jnp.broadcast_to(jnp.arange(16), (2, 16)),
                 mlm_positions=jnp.asarray(positions), mlm_labels=jnp.asarray(np.take_along_axis(tokens, positions, 1)),
                 mlm_weights=jnp.ones((2, 3), jnp.float32))
    m = model.Ettin(cfg)
    loss, _ = objectives.loss_fn(params, batch, model=m, objective=objectives.get_objective("mntp2"))
    hidden = m.apply({"params": params}, batch["mlm_inputs"], mask=attention.BIDIRECTIONAL)
    logits = m.apply({"params": params}, hidden, method=model.Ettin.predict)
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = -np.mean([logp[b, p - 2, tokens[b, p]] for b in range(2) for p in positions[b]])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_add_an_attention_kernel(monkeypatch):
    """A kernel is one entry of `kernels.ATTENTION` (and its module): a model configured with its name uses it. Here
    a copy of the dense reference that counts its calls; the model's output equals the 'xla' implementation's."""
    calls = []

    def counting(q, k, v, *, segment_ids, band, block):
        calls.append(band)
        return attention.reference_attention(q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band)

    monkeypatch.setitem(kernels.ATTENTION, "counting", counting)
    cfg = sizes.model_config("tiny", vocab_size=64)
    params = model.init_params(cfg, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(5, 64, (1, 32)), jnp.int32)
    out = {impl: model.Ettin(cfg.replace(attention_impl=impl)).apply({"params": params}, tokens,
                                                                     mask=attention.CAUSAL)
           for impl in ("counting", "xla")}
    assert len(calls) == cfg.num_layers
    np.testing.assert_allclose(out["counting"], out["xla"], atol=1e-6)
    with pytest.raises(ValueError, match="counting"):  # the error lists the registered names
        kernels.resolve_impl("nope", (None, None), 32)


def test_add_a_data_source(tmp_path, monkeypatch):
    """A source is a `Source` subclass and one entry in `sources.FORMATS`: here CSV, one document per row. The
    pipeline mixes, chunks and packs it like any other, and its documents reach the batches."""
    import csv
    import sys
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_data_util import ByteTokenizer, take
    from ettin_jax import data
    from ettin_jax.data import sources

    class CsvSource(sources.Source):
        def __init__(self, name, path):
            self.name = name
            with open(path, newline="") as f:
                self.rows = list(csv.DictReader(f))

        def __len__(self):
            return len(self.rows)

        def load(self, i, stats):
            return {"source": self.name, "doc_id": self.rows[i]["id"], "text": self.rows[i]["text"]}

    monkeypatch.setitem(sources.FORMATS, "csv", lambda name, spec, base_dirs, stats, opts: CsvSource(
        name, sources.resolve_path(spec["path"], base_dirs)[0]))
    with open(tmp_path / "docs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([(f"row{i}", f"comma separated document number {i} " * 8) for i in range(20)])
    cfg = data.default_data_config()
    cfg.sources = [dict(name="csv", format="csv", path=str(tmp_path / "docs.csv"), weight=1.0)]
    cfg.num_streams = 2
    pipe = data.make_pipeline(cfg, seq_len=256, global_batch_size=4, seed=0, mlm_rate=0.0,
                              tokenizer=ByteTokenizer())
    docs = {p[1] for b in take(pipe.iterator(), 3) for r in b["provenance"]["rows"] for p in r["pieces"]}
    assert docs and all(d.startswith("row") for d in docs)
    with pytest.raises(ValueError, match="csv"):  # the error lists the registered formats
        sources.open_source(dict(name="x", format="xml", path=str(tmp_path)))
