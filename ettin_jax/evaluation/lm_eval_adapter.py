"""lm-evaluation-harness model `ettin`: runs the harness's tasks against our JAX checkpoints directly.

From the command line (the harness's own CLI and arguments, with `ettin` registered first):

    python -m ettin_jax.evaluation.lm_eval_adapter --model ettin --model_args pretrained=runs/demo,which=decoder \
        --tasks ettin_austen_cloze --include_path data/eval/lm_eval [--limit N] [--output_path DIR]

From Python:

    import ettin_jax.evaluation.lm_eval_adapter  # registers "ettin"
    lm_eval.simple_evaluate(model="ettin", model_args="pretrained=runs/demo,which=decoder", tasks=[...])

Why not plain `lm_eval --model ettin`: lm_eval 0.4.13 finds models only in its own table (`lm_eval.models.
MODEL_MAPPING`) and in modules already imported that call `register_model`; it reads no entry points for models,
and `--include_path` adds task YAMLs only (their `!function` modules are imported after the model is built). So
the module has to be imported before the harness's CLI runs, which is what `python -m` here does. lm_eval 0.4.13
adds its own models (`hf`, `vllm`, ...) only to an empty registry, so `lm_eval.models` is imported before `ettin` is
registered: both stay available.

An exported decoder needs none of this: `lm_eval --model hf --model_args pretrained=HF_DIR` scores it with
transformers, per request equal to this adapter within 1e-3 (tests/test_export_ecosystem.py).

`pretrained` is a training workdir or a Hugging Face folder; `which` picks the model of a paired workdir (default:
the decoder); `pll=True` lets an encoder answer likelihood requests by masked pseudo-log-likelihood. Scoring is
`ettin_jax.evaluation.likelihood` (the harness's context / continuation split, [CLS] as BOS); generation is
`ettin_jax.inference.generate` (greedy, KV cache) cut at the first stop string. An encoder asked to generate is an
error naming what was expected. The bundled local tasks (data/eval/lm_eval/*.yaml) read data/eval/ and need no
network.
"""
from __future__ import annotations

from typing import Optional

import lm_eval.models  # noqa: F401  (fills lm_eval's registry with its own models: see below)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ettin_jax import inference
from ettin_jax.evaluation import likelihood
from ettin_jax.evaluation.models import Model, load_models


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


class EttinLM(LM):
    """An Ettin encoder or decoder behind lm-evaluation-harness's LM interface."""

    def __init__(self, pretrained: Optional[str] = None, which: Optional[str] = None, pll=False,
                 max_length: int = 512, batch_size=16, model: Optional[Model] = None, **kwargs):
        super().__init__()
        if model is None:
            if not pretrained:
                raise ValueError("model_args needs pretrained=WORKDIR_OR_HF_FOLDER")
            from ettin_jax.checkpoint import load_models as workdir_models
            import os
            if which is None and os.path.isdir(os.path.join(pretrained, "checkpoints")):
                archs = workdir_models(pretrained)
                which = "decoder" if "decoder" in archs else None
            model = load_models(pretrained, which=which)[0]
        self.model, self.pll, self.max_length = model, _bool(pll), int(max_length)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [likelihood.encode_pair(self.model, ctx, cont) for ctx, cont in (r.args for r in requests)]
        return likelihood.loglikelihoods(self.model, pairs, pll=self.pll, max_len=self.max_length,
                                         batch_size=self.batch_size, task="lm_eval loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [likelihood.rolling_loglikelihood(self.model, r.args[0], pll=self.pll, max_len=self.max_length)
                for r in requests]

    def generate_until(self, requests) -> list[str]:
        if self.model.arch != "decoder":
            raise ValueError(f"generate_until needs a decoder; {self.model.name} is an encoder (bidirectional "
                             "attention), which cannot generate: pass a decoder (which=decoder)")
        out = []
        for r in requests:
            context, gen_kwargs = r.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = [self.model.tokenizer.cls_id] + likelihood.text_ids(self.model, context)
            ids = ids[-max(1, self.max_length - max_new):]
            new = inference.generate(self.model.params, self.model.cfg, ids, max_new, greedy=True,
                                     eos_id=self.model.cfg.sep_token_id)
            text = self.model.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


if __name__ != "__main__":  # under `python -m` the importable module (imported below) registers, not this copy
    register_model("ettin")(EttinLM)


def main(argv=None) -> None:
    """lm_eval's command line with the `ettin` model registered (this module is imported, so it is)."""
    import sys
    from lm_eval.__main__ import cli_evaluate
    argv = sys.argv[1:] if argv is None else list(argv)
    saved, sys.argv = sys.argv, ["lm_eval"] + argv  # the harness's CLI parses sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    from ettin_jax.evaluation.lm_eval_adapter import main as registered_main
    registered_main()
