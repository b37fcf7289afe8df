"""The lm-evaluation-harness adapter: a bundled local task end to end through `lm_eval.simple_evaluate`, offline."""
import os

import jax
import pytest

lm_eval = pytest.importorskip("lm_eval")

from ettin_jax.evaluation import likelihood, tasks  # noqa: E402
from ettin_jax.evaluation.models import Model  # noqa: E402
from ettin_jax.tokenizer import TextTokenizer  # noqa: E402
from ettin_jax.model import ModelConfig, init_params  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(vocab_size=8192, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=1,
                   pad_token_id=3, cls_token_id=1, sep_token_id=2, mask_token_id=4, unk_token_id=0)


def _model(arch):
    return Model(f"tiny:{arch}", init_params(TINY, jax.random.key(0)), TINY, arch,
                 TextTokenizer(os.path.join(REPO, "data", "tokenizer")))


@pytest.mark.slow
def test_local_task_end_to_end_matches_our_multiple_choice(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager
    from ettin_jax.evaluation.lm_eval_adapter import EttinLM
    m = _model("decoder")
    result = lm_eval.simple_evaluate(model=EttinLM(model=m), tasks=["ettin_austen_cloze"], limit=24,
                                     task_manager=TaskManager(include_path=os.path.join(REPO, "data", "eval",
                                                                                         "lm_eval")))
    got = result["results"]["ettin_austen_cloze"]
    ours = likelihood.multiple_choice(m, tasks.read_jsonl("austen_cloze.jsonl")[:24])
    assert got["acc,none"] == pytest.approx(ours["acc"]) and got["acc_norm,none"] == pytest.approx(ours["acc_norm"])


@pytest.mark.slow
def test_adapter_is_registered_and_generation_needs_a_decoder():
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from ettin_jax.evaluation.lm_eval_adapter import EttinLM
    assert get_model("ettin") is EttinLM
    req = Instance(request_type="generate_until", doc={}, arguments=("def main(", {"until": ["\n"],
                                                                                   "max_gen_toks": 4}), idx=0)
    with pytest.raises(ValueError, match="generate_until needs a decoder"):
        EttinLM(model=_model("encoder")).generate_until([req])
    out = EttinLM(model=_model("decoder")).generate_until([req])
    assert isinstance(out[0], str) and "\n" not in out[0]
    with pytest.raises(ValueError, match="--pll"):
        EttinLM(model=_model("encoder")).loglikelihood(
            [Instance(request_type="loglikelihood", doc={}, arguments=("a", " b"), idx=0)])
    assert EttinLM(model=_model("encoder"), pll="true").loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=("some text here",), idx=0)])[0] < 0


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The tiny model exported as Hugging Face folders (encoder and decoder), as a user would pass them."""
    from ettin_jax.hf import save_hf_folder
    root = tmp_path_factory.mktemp("hf")
    params = init_params(TINY, jax.random.key(0))
    return {arch: save_hf_folder(params, TINY, arch, str(root / arch), os.path.join(REPO, "data", "tokenizer"))
            for arch in ("encoder", "decoder")}


def _ours(path, pll=False, limit=8):
    from ettin_jax.evaluation.models import load_models
    return likelihood.multiple_choice(load_models(path)[0], tasks.read_jsonl("austen_cloze.jsonl")[:limit], pll=pll)


@pytest.mark.slow
def test_harness_command_line_builds_the_model_from_model_args(hf_dirs, tmp_path):
    """`python -m ettin_jax.evaluation.lm_eval_adapter` is lm_eval's own CLI with `ettin` registered (lm_eval
    0.4.13 reads no model entry points, so plain `lm_eval --model ettin` cannot find it): the model comes from
    `--model_args pretrained=HF_DIR`, and the written results equal our own scoring."""
    import glob
    import json
    import subprocess
    import sys
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "ettin_jax.evaluation.lm_eval_adapter", "--model", "ettin", "--model_args",
           f"pretrained={hf_dirs['decoder']}", "--tasks", "ettin_austen_cloze", "--include_path",
           os.path.join(REPO, "data", "eval", "lm_eval"), "--limit", "8", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    written, = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    got = json.load(open(written))["results"]["ettin_austen_cloze"]
    ours = _ours(hf_dirs["decoder"])
    assert got["acc,none"] == pytest.approx(ours["acc"]) and got["acc_norm,none"] == pytest.approx(ours["acc_norm"])


@pytest.mark.slow
def test_model_args_string_loads_the_model_and_an_encoder_scores_by_pll(hf_dirs, monkeypatch):
    """`simple_evaluate(model="ettin", model_args="pretrained=...,pll=True")` on a local task: the encoder is
    built from the string and scored by masked pseudo-log-likelihood, equal to our own PLL multiple choice; without
    pll it is refused, naming the option."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager
    from ettin_jax.evaluation.lm_eval_adapter import EttinLM
    lm = EttinLM.create_from_arg_string(f"pretrained={hf_dirs['encoder']},pll=True,max_length=128")
    assert lm.model.arch == "encoder" and lm.pll is True and lm.max_length == 128
    manager = TaskManager(include_path=os.path.join(REPO, "data", "eval", "lm_eval"))
    result = lm_eval.simple_evaluate(model="ettin", model_args=f"pretrained={hf_dirs['encoder']},pll=True",
                                     tasks=["ettin_austen_cloze"], limit=8, task_manager=manager)
    got = result["results"]["ettin_austen_cloze"]
    ours = _ours(hf_dirs["encoder"], pll=True)
    assert got["acc,none"] == pytest.approx(ours["acc"]) and got["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    with pytest.raises(ValueError, match="pass --pll"):
        lm_eval.simple_evaluate(model="ettin", model_args=f"pretrained={hf_dirs['encoder']}",
                                tasks=["ettin_austen_cloze"], limit=2, task_manager=manager)
