"""Exported folders work with no glue: transformers' pipelines, lm-evaluation-harness's `hf` model and
sentence-transformers read them as ettin does (CPU, fp32, a tiny random model; no hub)."""
import contextlib
import glob
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ettin_jax import checkpoint, flops, hf, inference
from ettin_jax import tokenizer as tokenizer_lib
from ettin_jax.model import ModelConfig, init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "tokenizer")
# A large init range and a random decoder bias keep the logits far from uniform, so that greedy tokens and top-k
# orders do not hang on fp32 rounding (tests/test_hf.py: transformers' own fp32 noise is ~1e-5 at this range).
TINY = ModelConfig(vocab_size=8192, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
                   pad_token_id=3, cls_token_id=1, sep_token_id=2, mask_token_id=4, unk_token_id=0, init_std=0.2)
PROMPTS = ["def read_file(path):\n    with open(path) as f:", "It is a truth universally acknowledged",
           "import os\n"]
SENTENCES = ["Return the number of items in a container.", "She was not in the habit of", "x", "def f(a, b):"]


def _params(seed=0):
    params = init_params(TINY, jax.random.key(seed))
    params["decoder_bias"] = jax.random.normal(jax.random.key(seed + 1), params["decoder_bias"].shape)
    return params


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    params = _params()
    return {arch: hf.save_hf_folder(params, TINY, arch, str(root / arch), TOKENIZER) for arch in ("encoder", "decoder")}


@pytest.fixture(scope="module")
def zero_folders(tmp_path_factory):
    """The same export with all-zero weights, cheap to make (no initialisation compiled): for the file checks."""
    from ettin_jax.model import abstract_params
    root = tmp_path_factory.mktemp("zeros")
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), abstract_params(TINY)[0])
    return {arch: hf.save_hf_folder(params, TINY, arch, str(root / arch), TOKENIZER) for arch in ("encoder", "decoder")}


def _run_cli(fn, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = fn(argv)
    assert status == 0, out.getvalue()
    return out.getvalue()


# ------------------------------------------------------------------------------------------ tokenizer files


def test_exported_tokenizers_suit_their_architecture(zero_folders):
    """The decoder's tokenizer starts a text with [CLS] (BOS) and adds no [SEP] (EOS); the encoder's wraps it in
    both; both name bos/eos/pad/cls/sep/mask/unk; the decoder has a greedy generation config; and ettin's own
    reading of each folder (TextTokenizer) gives the ids transformers gives."""
    from transformers import AutoTokenizer
    text = "def main():\n    return 1"
    plain = tokenizer_lib.TextTokenizer(TOKENIZER).ids(text)
    expected = {"encoder": [1] + plain + [2], "decoder": [1] + plain}
    folders = zero_folders
    for arch, folder in folders.items():
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok(text).input_ids == expected[arch], arch
        assert tokenizer_lib.TextTokenizer(folder).encode(text) == expected[arch], arch
        ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad", "cls", "sep", "mask", "unk")}
        assert ids == dict(bos=1, eos=2, pad=3, cls=1, sep=2, mask=4, unk=0), arch
    gen = json.load(open(os.path.join(folders["decoder"], "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"], gen["do_sample"]) == (1, 2, 3, False)
    assert gen["max_new_tokens"] == inference.define_flags("generate")["max_new_tokens"].default
    assert not os.path.exists(os.path.join(folders["decoder"], "modules.json"))  # embeddings are the encoder's


# ------------------------------------------------------------------------------------ transformers pipelines


@pytest.mark.slow
def test_text_generation_pipeline_equals_ettin_generate(folders):
    """`pipeline("text-generation", model=folder)(prompt)`, no other argument, gives `ettin generate --greedy`'s
    tokens (the same number too: generation_config.json holds ettin's default of 64 new tokens)."""
    from transformers import pipeline
    generate = pipeline("text-generation", model=folders["decoder"])
    prompt_lens = []
    for prompt in PROMPTS:
        ours = json.loads(_run_cli(inference.main, ["ettin generate", f"--model={folders['decoder']}",
                                                    f"--prompt={prompt}", "--greedy", "--json"]).splitlines()[-1])
        theirs = generate(prompt, return_tensors=True)[0]["generated_token_ids"]
        prompt_ids = inference.encode_prompt(tokenizer_lib.TextTokenizer(folders["decoder"]), prompt)
        assert theirs[:len(prompt_ids)] == prompt_ids
        assert theirs[len(prompt_ids):] == ours["token_ids"], prompt
        prompt_lens.append(len(set(ours["token_ids"])))
    assert max(prompt_lens) > 1  # not one token repeated: the comparison sees the model's choices


@pytest.mark.slow
def test_fill_mask_pipeline_equals_ettin_fill_mask(folders):
    from transformers import pipeline
    fill = pipeline("fill-mask", model=folders["encoder"])
    for text in ("The capital of France is [MASK].", "def [MASK](path):\n    return open(path).read()"):
        argv = ["ettin fill-mask", f"--model={folders['encoder']}", f"--text={text}", "--top_k=5", "--json"]
        ours = json.loads(_run_cli(lambda a: inference.main(a, "fill-mask"), argv).splitlines()[-1])
        theirs = fill(text, top_k=5)
        assert [r["token"] for r in theirs] == [r["token_id"] for r in ours], text
        np.testing.assert_allclose([r["score"] for r in theirs], [r["score"] for r in ours], rtol=1e-4)


# --------------------------------------------------------------------------------- lm-evaluation-harness


@pytest.mark.slow
def test_importing_our_adapter_keeps_lm_evals_own_models():
    """lm_eval 0.4.13 adds its built-in models only to an empty registry: registering `ettin` first hid `hf`."""
    code = ("import ettin_jax.evaluation.lm_eval_adapter\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('hf').__name__, get_model('ettin').__name__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["HFLM", "EttinLM"]


@pytest.mark.slow
def test_lm_eval_hf_model_equals_our_adapter_per_request(folders, tmp_path):
    """`lm_eval --model hf --model_args pretrained=FOLDER` (lm_eval's own CLI, transformers underneath) on the
    bundled tasks: every request's log-likelihood equals our adapter's within 1e-3. `--device cpu` only because
    lm_eval's default device is cuda."""
    from lm_eval.api.instance import Instance
    from ettin_jax.evaluation.lm_eval_adapter import EttinLM
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={folders['decoder']}", "--device", "cpu", "--tasks",
           "ettin_austen_cloze,ettin_stdlib_nextline", "--include_path", os.path.join(REPO, "data", "eval", "lm_eval"),
           "--limit", "4", "--log_samples", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = EttinLM(pretrained=folders["decoder"])
    worst, n = 0.0, 0
    for task in ("ettin_austen_cloze", "ettin_stdlib_nextline"):
        path, = glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples = [json.loads(line) for line in open(path)]
        args = [(a["arg_0"], a["arg_1"]) for s in samples for a in s["arguments"].values()]
        theirs = np.array([float(r[0][0]) for s in samples for r in s["resps"]])
        got = ours.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=a, idx=0) for a in args])
        worst = max(worst, float(np.abs(theirs - np.array([g[0] for g in got])).max()))
        n += len(args)
    assert n >= 32 and worst < 1e-3, (n, worst)


# ---------------------------------------------------------------------------------- sentence-transformers


@pytest.mark.slow
def test_sentence_transformers_pools_as_our_evaluation(folders, tmp_path):
    """SentenceTransformer(folder) embeds as our retrieval evaluation's Embedder: the export's mean pooling, a
    cls-pooling export (sentence-transformers' own default would be mean), and a retrieval fine-tune exported from
    the evaluation (`Embedder.export`) whose embeddings moved away from the base model's."""
    from sentence_transformers import SentenceTransformer
    from ettin_jax.evaluation import retrieval
    from ettin_jax.evaluation.models import load_models
    base = load_models(folders["encoder"])[0]

    def st(folder):
        return SentenceTransformer(folder, device="cpu").encode(SENTENCES, convert_to_numpy=True)

    ours = retrieval.Embedder(base).encode(SENTENCES)
    assert np.abs(st(folders["encoder"]) - ours).max() < 1e-4
    cls_embedder = retrieval.Embedder(base, pooling="cls")
    cls_ours = cls_embedder.encode(SENTENCES)
    assert np.abs(cls_ours - ours).max() > 1e-2  # the two poolings differ: the check below can tell them apart
    assert np.abs(st(cls_embedder.export(str(tmp_path / "cls"))) - cls_ours).max() < 1e-4
    pairs = [dict(query=s, positive=s + " and more") for s in SENTENCES * 2]
    tuned = retrieval.contrastive_fine_tune(base, pairs, retrieval.ContrastiveConfig(steps=3, batch_size=8, lr=1e-3),
                                            log=None)
    tuned_ours = tuned.encode(SENTENCES)
    assert np.abs(tuned_ours - ours).max() > 1e-3
    folder = tuned.export(str(tmp_path / "tuned"))
    assert np.abs(st(folder) - tuned_ours).max() < 1e-4
    assert "contrastively fine-tuned" in open(os.path.join(folder, "README.md")).read()
    with pytest.raises(ValueError, match="only an encoder's embeddings are exported"):
        retrieval.Embedder(load_models(folders["decoder"])[0]).export(str(tmp_path / "dec"))


# ------------------------------------------------------------------------------- model card and import note


def _fake_workdir(path, arch, params):
    """A workdir as training leaves it (config, models, tokenizer, a step-5 checkpoint, the command, the
    metrics), without training."""
    checkpoint.save_models(path, {arch: TINY})
    checkpoint.write_json(path, "config.json", dict(size="tiny", objective="clm" if arch == "decoder" else "mlm",
                                                    phase="pretrain", cross_objective=dict(encoder_objective="mlm"),
                                                    data=dict(sources=[dict(name="austen", path="data/corpus/a.jsonl",
                                                                            weight=1.0)])))
    checkpoint.copy_tokenizer(TOKENIZER, path)
    ck = checkpoint.Checkpoints(path, async_save=False)
    ck.save(5, params={arch: params}, meta=dict(step=5, tokens=20480, phase="pretrain"))
    ck.close()
    checkpoint.append_jsonl(path, "commands.jsonl", dict(command="ettin train --config=configs/demo.py "
                                                                 f"--workdir={path}", start_step=0))
    for step, h in ((4, "aaaa"), (5, "bbbb"), (6, "cccc")):  # 6: logged past the checkpoint, then lost
        checkpoint.append_jsonl(path, "metrics.jsonl", dict(step=step, batch_hash=h))


@pytest.mark.slow  # ~3 s idle, 10 s on a loaded machine (a checkpoint, transformers, two imports)
def test_model_card_and_import_note(tmp_path):
    """The card of a workdir export states what and where from; its parameter count is transformers' own count;
    `ettin import` of a decoder states the fused-Wqkv optimizer difference, of an encoder not."""
    from transformers import AutoModelForCausalLM
    work = str(tmp_path / "work")
    _fake_workdir(work, "decoder", _params())
    out = str(tmp_path / "hf")
    _run_cli(lambda a: hf.main(a, "export"), ["ettin export", f"--workdir={work}", f"--out={out}"])
    card = open(os.path.join(out, "README.md")).read()
    n = AutoModelForCausalLM.from_pretrained(out).num_parameters()
    for fact in ("ModernBertDecoderForCausalLM", f"| parameters | {n:,} ", "| size | tiny |", "| objective | clm |",
                 "| phase | pretrain |", "20,480 non-pad tokens, step 5", f"workdir `{os.path.abspath(work)}`",
                 f"ettin train --config=configs/demo.py --workdir={work}", f"ettin export --workdir={work} --out={out}",
                 "batch hash of step 5", "`bbbb`", "austen (`data/corpus/a.jsonl`, weight 1.0)",
                 'pipeline("text-generation"', f"lm_eval --model hf --model_args pretrained={out}",
                 "fused Wqkv"):
        assert fact in card, fact
    said = _run_cli(lambda a: hf.main(a, "import"), ["ettin import", f"--hf={out}", f"--workdir={tmp_path / 'back'}"])
    assert hf.FUSED_QKV_NOTE in said and "v_proj moved ~1.7e-2" in said
    assert "FUSED_QKV_NOTE" in hf.__doc__ and "1.7e-2" in hf.__doc__
    enc = hf.save_hf_folder(_params(), TINY, "encoder", str(tmp_path / "enc"), TOKENIZER)
    card = open(os.path.join(enc, "README.md")).read()
    assert "SentenceTransformer(" in card and "mean pooling" in card and "not exported from a workdir" in card
    said = _run_cli(lambda a: hf.main(a, "import"), ["ettin import", f"--hf={enc}", f"--workdir={tmp_path / 'e'}"])
    assert hf.FUSED_QKV_NOTE not in said


# ----------------------------------------------------------------------------------------------------- MFU


def test_mfu_never_exceeds_one(monkeypatch):
    """A CPU peak measured while the machine was busy is measured again when a step runs faster, and raised to the
    observed rate if still below it; the log says which. A table peak is never re-measured."""
    measured = iter([150.0, 150.0])
    monkeypatch.setattr(flops, "_measure_matmul_peak", lambda *a: next(measured))
    monkeypatch.setattr(flops, "peak_flops_per_device", lambda dtype="float32": (100.0, "measured fp32 matmul peak"))
    logs = []
    peak = flops.Peak("float32", n_devices=2, log=logs.append)
    assert "measured fp32 matmul peak" in logs[0]
    assert peak.mfu(100.0) == pytest.approx(0.5)
    assert peak.mfu(240.0) == pytest.approx(0.8)  # 120 per device > 100: measured again, 150
    assert peak.per_device == 150.0 and "measured again" in peak.source and "measured again" in logs[-1]
    assert peak.mfu(400.0) == 1.0  # 200 per device > 150 measured again (150): raised to 200
    assert peak.per_device == 200.0 and "raised to the fastest observed rate" in logs[-1]
    assert peak.mfu(300.0) == pytest.approx(0.75)
    monkeypatch.setattr(flops, "_measure_matmul_peak", lambda *a: pytest.fail("a table value is not measured"))
    monkeypatch.setattr(flops, "peak_flops_per_device", lambda dtype="float32": (100.0, "TPU v4 bf16 dense table"))
    peak = flops.Peak()
    assert peak.mfu(50.0) == 0.5 and peak.mfu(200.0) == 1.0 and "raised" in peak.source
