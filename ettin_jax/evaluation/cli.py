"""`ettin eval`: evaluate workdirs (or Hugging Face folders) side by side.

    ettin eval --workdir=A [--workdir=B ...] [--tasks=all|austen_novel,stdlib_docstring,...] [--pll]
               [--which=encoder|decoder] [--out=eval_results.json] [--glue_dir=DIR] [--save_retrieval=DIR]

Prints a table (rows task/metric, one column per model; a paired workdir gives two columns) and writes the results
as JSON to --out. Bad input (an unknown task, an encoder on a likelihood task without --pll, a missing folder) is
one line on stderr and exit status 2.
"""
from __future__ import annotations

import json
import sys

from absl import flags

from ettin_jax.evaluation import classification, retrieval, runner, tasks

FLAGS = flags.FlagValues()  # private registry: no clash with other subcommands' flags
flags.DEFINE_multi_string("workdir", None, "training workdir or Hugging Face folder; repeatable", flag_values=FLAGS)
flags.DEFINE_list("tasks", ["all"], f"tasks: all, {', '.join(tasks.TASKS)}, glue/<task>", flag_values=FLAGS)
flags.DEFINE_enum("which", None, ["encoder", "decoder"], "only this model of each paired workdir", flag_values=FLAGS)
flags.DEFINE_boolean("pll", False, "score encoders on likelihood tasks by masked pseudo-log-likelihood",
                     flag_values=FLAGS)
flags.DEFINE_string("out", "eval_results.json", "where to write the results as JSON", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "bundled task data (default: the repository's data/eval)", flag_values=FLAGS)
flags.DEFINE_string("glue_dir", None, "TFDS data_dir holding glue/<task> (GLUE tasks only)", flag_values=FLAGS)
flags.DEFINE_list("lrs", ["3e-4"], "classification fine-tuning learning-rate grid (chosen on a dev split)",
                  flag_values=FLAGS)
flags.DEFINE_float("epochs", 8.0, "classification fine-tuning epochs", flag_values=FLAGS)
flags.DEFINE_integer("contrastive_steps", 150, "retrieval fine-tuning steps (batch 32, in-batch negatives)",
                     flag_values=FLAGS)
flags.DEFINE_string("save_retrieval", None, "export each encoder's retrieval fine-tune under this folder "
                    "(a Hugging Face folder per model and task, loadable by sentence-transformers)", flag_values=FLAGS)
flags.DEFINE_boolean("quiet", False, "print only the table", flag_values=FLAGS)

USAGE = "--workdir=A [--workdir=B ...] [--tasks=all] [--pll] [--out=eval_results.json]"


def main(argv, subcommand="eval") -> int:
    from ettin_jax import cli
    prog = argv[0] if argv else "ettin eval"
    rest = cli.parse_flags(FLAGS, argv, USAGE)
    if isinstance(rest, int):
        return rest
    try:
        if not FLAGS.workdir:
            raise ValueError("--workdir is required (repeat it to compare several)")
        names = tasks.resolve(FLAGS.tasks)
        try:
            lrs = tuple(float(x) for x in FLAGS.lrs)
        except ValueError:
            raise ValueError(f"--lrs={','.join(FLAGS.lrs)} is not a list of numbers") from None
        log = (lambda *_: None) if FLAGS.quiet else (lambda m: print(m, file=sys.stderr))
        results = runner.evaluate_paths(
            FLAGS.workdir, names, which=FLAGS.which, pll=FLAGS.pll, data_dir=FLAGS.data_dir,
            glue_dir=FLAGS.glue_dir, finetune=classification.FinetuneConfig(lrs=lrs, epochs=FLAGS.epochs),
            contrastive=retrieval.ContrastiveConfig(steps=FLAGS.contrastive_steps),
            save_retrieval=FLAGS.save_retrieval, log=log)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {cli.user_error(e) or e}", file=sys.stderr)
        return 2
    print(runner.format_table(results))
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.out}")
    return 0
