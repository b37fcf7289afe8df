"""Downstream evaluation of Ettin models: the paper's comparisons (reference section 5) in JAX.

    ettin eval --workdir=A [--workdir=B ...] --tasks=all [--pll] [--out=eval_results.json]

Modules: `metrics` (the metrics, numpy), `models` (loading, batching, pooling), `classification` (GLUE-style
fine-tuning), `retrieval` (embeddings, `Embedder.encode`, contrastive fine-tuning), `likelihood` (decoder
log-likelihood, encoder pseudo-log-likelihood, multiple choice), `pronouns` (WinoGender-style probe), `tasks` (the
registry of bundled and GLUE tasks), `runner` (side-by-side tables), `lm_eval_adapter` (lm-evaluation-harness model
`ettin`; imported only when lm_eval is wanted).
"""


def main(argv, subcommand="eval"):
    from ettin_jax.evaluation.cli import main as _main
    return _main(argv, subcommand=subcommand)
