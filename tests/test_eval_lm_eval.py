"""The lm-evaluation-harness adapter: a bundled local task end to end through `lm_eval.simple_evaluate`, offline."""
import os

import jax
import pytest

lm_eval = pytest.importorskip("lm_eval")

from ettin_jax.evaluation import likelihood, tasks  # noqa: E402
from ettin_jax.evaluation.models import Model  # noqa: E402
from ettin_jax.inference import TextTokenizer  # noqa: E402
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
