"""The `ettin` command: one entry point, one module per subcommand.

Each subcommand lives in the module that owns its logic and exposes `main(argv)`; the module defines its own
absl flags at import time, so only the flags of the chosen subcommand exist in a process.
"""
import importlib
import sys

from absl import flags

from ettin_jax.kernels.cpu import hostmem

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("ettin_jax.train", "train a model (any size, objective, phase) from a config"),
    "export": ("ettin_jax.hf", "write a workdir's model as a Hugging Face folder"),
    "import": ("ettin_jax.hf", "read a Hugging Face folder into a workdir that training continues from"),
    "fill-mask": ("ettin_jax.inference", "top-k fills of a [MASK] token"),
    "generate": ("ettin_jax.inference", "continue a prompt with a decoder (KV cache)"),
    "tokenizer": ("ettin_jax.tokenizer", "train a tokenizer: `ettin tokenizer train --input=... --out=...`"),
    "batches": ("ettin_jax.data.provenance", "print which documents formed a step's batch"),
    "bench": ("ettin_jax.bench", "time the train step and the inference forward"),
    "eval": ("ettin_jax.evaluation", "evaluate workdirs or HF folders side by side on downstream tasks"),
    "sweep": ("ettin_jax.sweep", "run every point of a config sweep (locally, or print TPU commands)"),
    "sweep-report": ("ettin_jax.sweep", "gather a sweep's final metrics into a table and plots"),
    "compile": ("ettin_jax.compile", "compile the train step for a TPU topology (or this host): memory per chip, fits or not"),
}


HELP_FLAGS = ("-h", "--help", "-help", "--helpfull")


def flag_error(e: Exception) -> str:
    """A flag error in one line. config_flags re-raises a config's own error (an unknown size, say) with the
    traceback pasted into the message; the original error, at the end of the exception chain, says it all."""
    head = str(e).splitlines()[0].replace("Error whilst parsing config file:", "").strip()
    root = e
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    return head if root is e else f"{head} {str(root).strip().splitlines()[0]}"


def parse_flags(fv, argv: list[str], usage_line: str, *, positional: bool = False):
    """Parses a subcommand's private absl FlagValues: its positional arguments, or an exit status.

    `--help` prints `usage_line` and the flags and gives 0; an unknown or malformed flag, or a positional argument
    where the subcommand takes none (`positional=False`), is one line on stderr (the error and the usage) and gives
    2. So every subcommand answers `ettin SUBCOMMAND --help` and bad arguments the same way, never with a traceback.
    """
    prog = argv[0] if argv else "ettin"
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(f"usage: {prog} {usage_line}\n\n{fv.get_help()}")
        return 0
    fv.unparse_flags()  # a second call in one process must not see the first call's values
    try:
        rest = fv(argv)[1:]
        if rest and not positional:
            raise flags.Error(f"unexpected arguments {' '.join(rest)}")
        return rest
    except flags.Error as e:
        print(f"{prog}: error: {flag_error(e)}; usage: {prog} {usage_line} (see `{prog} --help`)",
              file=sys.stderr)
        return 2


def usage() -> str:
    lines = ["usage: ettin SUBCOMMAND [--flags]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`ettin SUBCOMMAND --help` lists a subcommand's flags."]
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:  # the process's entry point (not a call from Python): before jax starts its threads
        hostmem.keep_freed_memory()
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0 if len(argv) >= 2 else 2
    name = argv[1]
    if name not in SUBCOMMANDS:
        print(f"ettin: unknown subcommand {name!r}; expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # The module sees `ettin-SUBCOMMAND` as its program name and its own flags after it.
    return module.main([f"ettin {name}"] + argv[2:], subcommand=name) or 0


if __name__ == "__main__":
    sys.exit(main())
