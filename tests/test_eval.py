"""Evaluation on tiny models: likelihoods against a hand-rolled forward, retrieval ranking, the classifier beating
the majority class, bad input (wrong architecture, unknown task, label set vs head), and `ettin eval` end to end."""
import importlib.resources
import json
import os
import sys

import jax
import numpy as np
import pytest

from ettin_jax import attention
from ettin_jax.evaluation import classification, likelihood, metrics, retrieval, runner, tasks
from ettin_jax.evaluation import cli as eval_cli
from ettin_jax.evaluation.models import Model
from ettin_jax.tokenizer import TextTokenizer
from ettin_jax.model import Ettin, ModelConfig, init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(vocab_size=8192, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=1,
                   pad_token_id=3, cls_token_id=1, sep_token_id=2, mask_token_id=4, unk_token_id=0)


@pytest.fixture(scope="module")
def pair():
    params = init_params(TINY, jax.random.key(0))
    tok = TextTokenizer(os.path.join(REPO, "data", "tokenizer"))
    return {arch: Model(f"tiny:{arch}", params, TINY, arch, tok) for arch in ("encoder", "decoder")}


def _logp(model, tokens):
    hidden = Ettin(model.cfg).apply({"params": model.params}, np.asarray([tokens]), mask=model.mask)
    logits = Ettin(model.cfg).apply({"params": model.params}, hidden, method=Ettin.predict)
    return np.asarray(jax.nn.log_softmax(logits[0], -1))


@pytest.mark.slow
def test_decoder_loglikelihood_is_the_sum_over_continuation_tokens(pair):
    m = pair["decoder"]
    ctx, cont = likelihood.encode_pair(m, "It is a truth universally", " acknowledged")
    assert ctx[0] == 1 and cont
    (ll, greedy), = likelihood.loglikelihoods(m, [(ctx, cont)])
    seq = ctx + cont
    lp = _logp(m, seq)
    expected = sum(lp[t - 1, seq[t]] for t in range(len(ctx), len(seq)))
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy == all(lp[t - 1].argmax() == seq[t] for t in range(len(ctx), len(seq)))


@pytest.mark.slow
def test_encoder_pll_masks_each_continuation_token(pair):
    m = pair["encoder"]
    ctx, cont = [1, 100, 200], [300, 400]
    (ll, _), = likelihood.loglikelihoods(m, [(ctx, cont)], pll=True)
    seq = ctx + cont + [2]
    expected = 0.0
    for p in (3, 4):
        masked = list(seq)
        masked[p] = 4
        expected += _logp(m, masked)[p, seq[p]]
    assert ll == pytest.approx(expected, abs=1e-4)


def test_encoder_on_a_likelihood_task_needs_pll(pair):
    with pytest.raises(ValueError, match="--pll"):
        tasks.run("austen_cloze", pair["encoder"])


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'glu'.*austen_novel"):
        tasks.resolve(["glu"])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        tasks.resolve(["glue/nope"])


def test_glue_without_local_data_says_so():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        tasks.glue_split("sst2", "train", None)


def _local_glue(data_dir, configs=("sst2", "mrpc"), n_train=64, n_val=24):
    """GLUE's layout and feature names (glue/<task>/2.0.0, ClassLabel `label`, int32 `idx`) for a few tasks,
    prepared locally in ArrayRecord by a builder of our own (nothing downloaded, no TensorFlow). SST-2 sentences
    carry their label in a word, so a classifier can learn them."""
    sys.modules.setdefault("importlib_resources", importlib.resources)  # TFDS's preparation looks it up
    tfds = pytest.importorskip("tensorflow_datasets")
    fields = {"sst2": ("sentence",), "mrpc": ("sentence1", "sentence2")}
    names = {"sst2": ["negative", "positive"], "mrpc": ["not_equivalent", "equivalent"]}

    class Glue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("2.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in configs]

        def _info(self):
            feats = {f: tfds.features.Text() for f in fields[self.builder_config.name]}
            feats.update(label=tfds.features.ClassLabel(names=names[self.builder_config.name]), idx=np.int32)
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats),
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(n_train, 0), "validation": self._generate_examples(n_val, 1)}

        def _generate_examples(self, n, offset):
            words = ("awful dreadful", "lovely splendid")
            for i in range(n):
                label = (i * 7 + offset) % 3 % 2
                ex = {f: f"{words[label]} text {i} {f}" for f in fields[self.builder_config.name]}
                yield i, dict(ex, label=label, idx=i)

    for c in configs:
        Glue(config=c, data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


@pytest.mark.slow
def test_glue_through_tfds_end_to_end(tmp_path, pair):
    """GLUE's code path on a local ArrayRecord copy: pairs joined with [SEP], labels as class ids, a classifier
    fine-tuned on train and scored on validation."""
    glue_dir = _local_glue(tmp_path / "tfds")
    mrpc = tasks.glue_split("mrpc", "validation", glue_dir)
    assert len(mrpc) == 24 and mrpc[0]["text"] == (
        "lovely splendid text 0 sentence1 [SEP] lovely splendid text 0 sentence2")
    assert {ex["label"] for ex in mrpc} == {0, 1}
    out = tasks.run("glue/sst2", pair["encoder"], glue_dir=glue_dir, log=None,
                    finetune=classification.FinetuneConfig(lrs=(1e-3,), epochs=4, max_len=32, batch_size=16))
    assert out["majority"] == pytest.approx(metrics.majority_baseline(
        [ex["label"] for ex in tasks.glue_split("sst2", "train", glue_dir)],
        [ex["label"] for ex in tasks.glue_split("sst2", "validation", glue_dir)]))
    assert out["accuracy"] == 1.0, out  # the label is in the words


def test_glue_prepared_as_tfrecord_is_one_clear_line(tmp_path, capsys):
    """A default `tfds build` writes TFRECORD, which tfds.data_source cannot read without TensorFlow: the error
    names the format found and the command that rebuilds it, in the library and through `ettin eval`. (Writing
    TFRECORD needs TensorFlow, so the copy is an ArrayRecord one whose metadata says TFRECORD, as TFDS would.)"""
    glue_dir = _local_glue(tmp_path / "tfds", configs=("sst2",), n_train=4, n_val=2)
    version = tmp_path / "tfds" / "glue" / "sst2" / "2.0.0"
    for f in version.glob("glue-*"):
        f.rename(version / f.name.replace("array_record", "tfrecord"))
    info = json.loads((version / "dataset_info.json").read_text())
    (version / "dataset_info.json").write_text(json.dumps(dict(info, fileFormat="tfrecord")))
    rebuild = f"tfds build glue/sst2 --data_dir={glue_dir} --file_format=array_record"
    with pytest.raises(ValueError, match="prepared as tfrecord.*needs array_record") as e:
        tasks.glue_split("sst2", "train", glue_dir)
    assert rebuild in str(e.value)
    capsys.readouterr()  # TFDS's progress bars
    assert eval_cli.main(["ettin eval", f"--workdir={tmp_path / 'no-model-needed'}", "--tasks=glue/sst2",
                          f"--glue_dir={glue_dir}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and rebuild in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="--file_format=array_record"):  # the hint for missing data
        tasks.glue_split("mrpc", "train", glue_dir)


def test_label_set_that_does_not_match_the_head(pair):
    clf = classification.Classifier(pair["encoder"], None, ("neg", "pos"), "mean", 32)
    with pytest.raises(ValueError, match=r"label 'neutral' \(example 1\).*\['neg', 'pos'\]"):
        classification.evaluate(clf, [dict(text="a", label="pos"), dict(text="b", label="neutral")])
    # the other direction: a head with a label the data never shows
    clf3 = classification.Classifier(pair["encoder"], None, ("neg", "pos", "neutral"), "mean", 32)
    with pytest.raises(ValueError, match=r"test data: the head's labels are \['neg', 'pos', 'neutral'\], but the "
                                         r"data's label set is \['neg', 'pos'\]: no example of \['neutral'\]"):
        classification.evaluate(clf3, [dict(text="a", label="pos"), dict(text="b", label="neg")])
    with pytest.raises(ValueError, match=r"training data: the head's labels .* no example of \['c'\]"):
        classification.fine_tune(pair["encoder"], [dict(text="a", label="a"), dict(text="b", label="b")],
                                 labels=("a", "b", "c"), log=None)
    with pytest.raises(ValueError, match="pooling 'last' does not suit a encoder"):
        classification.fine_tune(pair["encoder"], [dict(text="a", label="x")],
                                 config=classification.FinetuneConfig(pooling="last"))


def test_retrieval_ranks_by_cosine_and_scores():
    class Stub:  # an embedder with fixed vectors
        vecs = {"q1": [1, 0], "q2": [0, 1], "d1": [0.9, 0.1], "d2": [0.1, 0.9], "d3": [-1, 0]}

        def encode(self, sentences, **kw):
            v = np.array([self.vecs[s] for s in sentences], np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    queries, corpus = {"a": "q1", "b": "q2"}, {"x": "d1", "y": "d2", "z": "d3"}
    assert retrieval.rank(Stub(), queries, corpus, k=3) == {"a": ["x", "y", "z"], "b": ["y", "x", "z"]}
    scores = retrieval.evaluate(Stub(), queries, corpus, {"a": {"y": 1}, "b": {"y": 1}})
    assert scores["mrr@10"] == pytest.approx((0.5 + 1) / 2)


def test_encode_interface(pair):
    emb = retrieval.Embedder(pair["encoder"]).encode(["one sentence", "and another"], normalize_embeddings=True,
                                                     batch_size=4)
    assert emb.shape == (2, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_pronoun_probe_counts_every_sentence(pair):
    spec = dict(pronouns=dict(male="he", female="she", neutral="they"), occupations=["nurse", "pilot"],
                templates=["The {occupation} said that {pronoun} would come."])
    from ettin_jax.evaluation import pronouns
    for m in pair.values():
        out = pronouns.probe(m, spec)
        assert out["n"] == 2 and sum(out[c] for c in pronouns.CLASSES) == pytest.approx(1.0)


def test_pronoun_probe_counts_the_preferred_pronoun(pair, monkeypatch):
    """A scorer with a known preference per occupation (nurse: she, pilot: he, teacher and judge: they) gives
    shares 1/4, 1/4, 1/2; every request is the pronoun between its prefix and suffix, scored with right context."""
    from ettin_jax.evaluation import pronouns
    m = pair["decoder"]
    spec = dict(pronouns=dict(male="he", female="she", neutral="they"),
                occupations=["nurse", "pilot", "teacher", "judge"],
                templates=["The {occupation} said that {pronoun} would come.", "Ask the {occupation} if {pronoun} had time."])
    prefer = dict(nurse="she", pilot="he", teacher="they", judge="they")
    seen = []

    def scorer(model, reqs, pll, task):
        assert pll and task == "pronouns" and model is m
        out = []
        for ctx, cont, right in reqs:
            prefix, pronoun = m.tokenizer.decode(ctx, skip_special_tokens=True), m.tokenizer.decode(cont).strip()
            occupation, = [o for o in prefer if o in prefix]
            seen.append((prefix, pronoun, m.tokenizer.decode(right)))
            out.append((-1.0 if pronoun == prefer[occupation] else -5.0, False))
        return out
    monkeypatch.setattr(pronouns, "loglikelihoods", scorer)
    out = pronouns.probe(m, spec)
    assert out == dict(male=0.25, female=0.25, neutral=0.5, n=8)
    assert len(seen) == 24 and ("The nurse said that", "they", " would come.") in [
        (p.strip(), pr, r) for p, pr, r in seen]
    prefer.update(judge="he")  # one occupation (two sentences) moves from neutral to male
    assert pronouns.probe(m, spec) == dict(male=0.5, female=0.25, neutral=0.25, n=8)


@pytest.mark.slow
def test_classifier_beats_the_majority_class_at_demo_scale():
    """The demo model (configs/demo.py: 4 layers, 128 wide, the bundled tokenizer), from scratch, fine-tuned with
    the committed report's classification settings (lr 1e-3, 3 epochs, max_len 96, mean pooling) on the bundled
    task: clearly above always-majority (measured 0.611 vs 0.167; ~55 s of CPU)."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import demo
    from ettin_jax.train import model_configs
    config = demo.get_config()
    cfg = model_configs(config, config.data.special_ids)["encoder"]
    model = Model("demo:encoder", init_params(cfg, jax.random.key(0)), cfg, "encoder",
                  TextTokenizer(os.path.join(REPO, "data", "tokenizer")))
    train, test = tasks.read_jsonl("austen_novel_train.jsonl"), tasks.read_jsonl("austen_novel_test.jsonl")
    clf = classification.fine_tune(model, train, config=classification.FinetuneConfig(
        lrs=(1e-3,), epochs=3, max_len=96), log=None)
    acc = classification.evaluate(clf, test)["accuracy"]
    majority = metrics.majority_baseline([e["label"] for e in train], [e["label"] for e in test])
    assert acc > majority + 0.1, (acc, majority)


def test_cli_rejects_an_unknown_task_before_loading(capsys, tmp_path):
    assert eval_cli.main(["ettin eval", f"--workdir={tmp_path}", "--tasks=austen_novel,nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_ettin_eval_side_by_side_on_a_paired_workdir(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_train import small
    from ettin_jax import train
    train.train(small(steps=2), str(tmp_path / "pair"), log=lambda *_: None)
    data = tmp_path / "data"  # a few items of each task: this tests the command, not the scores
    data.mkdir()
    (data / "austen_cloze.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                     for r in tasks.read_jsonl("austen_cloze.jsonl")[:12]))
    spec = json.load(open(os.path.join(tasks.DATA_DIR, "pronoun_templates.json")))
    spec.update(occupations=spec["occupations"][:3], templates=spec["templates"][:2])
    (data / "pronoun_templates.json").write_text(json.dumps(spec))
    out = tmp_path / "r.json"
    assert eval_cli.main(["ettin eval", f"--workdir={tmp_path / 'pair'}", "--tasks=austen_cloze",
                          f"--out={out}", "--quiet", f"--data_dir={data}"]) == 2
    assert "pass --pll" in capsys.readouterr().err
    assert eval_cli.main(["ettin eval", f"--workdir={tmp_path / 'pair'}", "--tasks=pronouns,austen_cloze", "--pll",
                          f"--out={out}", "--quiet", f"--data_dir={data}"]) == 0
    table = capsys.readouterr().out
    assert "pair:decoder" in table and "pair:encoder" in table and "austen_cloze/acc" in table
    res = json.loads(out.read_text())
    assert set(res["scores"]) == {"pair:decoder", "pair:encoder"}
    assert 0 <= res["scores"]["pair:encoder"]["austen_cloze"]["acc"] <= 1
    assert "| task/metric |" in runner.format_table(res, "markdown")


def _compare_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare", os.path.join(REPO, "experiments", "compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic(cls=(0.6, 0.3, 360), ndcg=(0.5, 0.1), mrr=(0.5, 0.1), gen=(0.6, 0.25), cross=None):
    """rows and results as compare.py builds them: encoder / decoder (and the cross-objective pair) at one size.
    cls: (encoder, decoder, n) accuracy; ndcg / mrr: (encoder, decoder), 200 queries; gen: (decoder, encoder)
    accuracy on both generation tasks (n=100); cross: (encoder-from-decoder accuracy, decoder-from-encoder acc)."""
    def scores(arch):
        e = arch == "encoder"
        out = dict(austen_novel=dict(accuracy=cls[0] if e else cls[1], majority=1 / 6),
                   stdlib_docstring={"ndcg@10": ndcg[0] if e else ndcg[1], "mrr@10": mrr[0] if e else mrr[1],
                                     "n": 200})
        if cls[2] is not None:
            out["austen_novel"]["n"] = cls[2]
        for t in ("austen_cloze", "stdlib_nextline"):
            out[t] = dict(acc=gen[1] if e else gen[0], chance=0.25, n=100)
        return out
    results = dict(scores={"p:encoder": scores("encoder"), "p:decoder": scores("decoder")})
    rows = [dict(name="p:encoder", size="tiny", role="encoder", params=1e6),
            dict(name="p:decoder", size="tiny", role="decoder", params=1e6)]
    if cross:
        results["scores"]["c:encoder"] = dict(austen_novel=dict(accuracy=cross[0], n=360))
        results["scores"]["c:decoder"] = {t: dict(acc=cross[1], chance=0.25, n=100)
                                          for t in ("austen_cloze", "stdlib_nextline")}
        rows += [dict(name="c:encoder", size="tiny", role="encoder-from-decoder", params=1e6),
                 dict(name="c:decoder", size="tiny", role="decoder-from-encoder", params=1e6)]
    return rows, results


def test_compare_verdict_holds_does_not_hold_and_ties():
    """compare.py's verdict from the numbers: 2 standard errors from each task's own n, retrieval on nDCG@10
    (MRR only mentioned), and the cross-objective claim judged."""
    compare = _compare_module()
    holds = lambda **kw: compare.verdict(*_synthetic(**kw))
    lines, overall = holds()
    assert overall == [True] and "n=360" in lines[1] and "the encoder is **ahead**" in lines[1]
    assert any("verdict at this size: the direction of the paper's finding holds**" in l for l in lines)
    # the other way round on classification
    lines, overall = holds(cls=(0.3, 0.6, 360))
    assert overall == [False] and "the encoder is **behind**" in lines[1]
    # a tie: 0.32 vs 0.28 at n=360 is within 2 SE (0.068)
    lines, overall = holds(cls=(0.32, 0.28, 360))
    assert overall == [False] and "a **tie**" in lines[1] and "does NOT hold" in lines[-2]
    # n comes from the data: 0.6 vs 0.45 is ahead at n=360 but a tie at n=40 (2 SE = 0.22)
    assert "**ahead**" in holds(cls=(0.6, 0.45, 360))[0][1]
    lines, overall = holds(cls=(0.6, 0.45, 40))
    assert "n=40" in lines[1] and "a **tie**" in lines[1] and overall == [False]
    lines, _ = holds(cls=(0.6, 0.3, None))  # a cache without n: the bundled test set's size
    assert f"n={len(tasks.read_jsonl('austen_novel_test.jsonl'))}" in lines[1]
    # retrieval is judged on nDCG@10 (a tie here) even where MRR@10 alone would say ahead
    lines, overall = holds(ndcg=(0.30, 0.28), mrr=(0.5, 0.1))
    ret, = [l for l in lines if l.startswith("- retrieval")]
    assert "nDCG@10 encoder 0.300 vs decoder 0.280: the encoder is a **tie**" in ret and "MRR@10 0.500 vs 0.100" in ret
    assert overall == [False]
    # cross-objective: both continuations still behind -> holds; one level with its native model -> does not
    lines, overall = holds(cross=(0.35, 0.3))
    assert overall == [True] and sum("still **behind** it: the gap is not closed" in l for l in lines) == 3
    assert "- cross-objective: the gap stays open in all 3 comparisons (as the paper)" in lines
    lines, overall = holds(cross=(0.59, 0.3))
    assert overall == [False] and any("level with it (within 2 standard errors): the gap is closed" in l for l in lines)
    lines, overall = holds(cls=(0.30, 0.30, 360), cross=(0.30, 0.3))  # no gap between the pair to begin with
    assert overall == [False] and any("there was no gap to close (the encoder is not ahead of the decoder" in l
                                      for l in lines)
    assert "- cross-objective: the gap is closed or absent in 1 of 3 comparisons (paper: it stays open)" in lines


def test_compare_report_calls_the_time_wall_clock():
    note = _compare_module().timing_note({"a:encoder/austen_novel": 90.0, "a:decoder/austen_novel": 30.0})
    assert "2.0 minutes of wall-clock time, summed over models and tasks" in note and "process time" not in note
