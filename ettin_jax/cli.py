"""The `ettin` command: one entry point, one module per subcommand.

Each subcommand lives in the module that owns its logic and exposes `main(argv)`; the module defines its own
absl flags at import time, so only the flags of the chosen subcommand exist in a process.

Bad input is one line on stderr and exit status 2 (`run_subcommand`, `user_error`): a flag or config field (with the
nearest valid names), a missing or damaged file, a read-only or full disk, a step too big for the device. Only an
internal error prints a traceback, followed by a one-line summary.
"""
import errno
import importlib
import json
import logging
import os
import re
import sys
import traceback
from typing import Optional

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


class UserError(Exception):
    """Bad input (a flag, a file, a folder): one line on stderr and exit status 2, never a traceback."""


def _root(e: BaseException) -> BaseException:
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    return e


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


def flag_error(e: Exception, argv=()) -> str:
    """A flag error in one line. config_flags re-raises a config's own error (an unknown size, say) with the
    traceback pasted into the message; the original error, at the end of the exception chain, says it all. An
    unknown `--config.x.y` field is named with the nearest valid ones."""
    head = _first_line(e).replace("Error whilst parsing config file:", "").strip()
    root = _root(e)
    if isinstance(root, (KeyError, AttributeError)):
        unknown = unknown_config_override(argv)
        if unknown:
            return unknown
    tail = _first_line(root).strip("'\"")
    return head if root is e or tail in head else f"{head} {tail}"


def config_argument(argv, default: Optional[str]) -> Optional[str]:
    """The value of --config in argv (`--config=X` or `--config X`), else `default`."""
    for i, a in enumerate(argv):
        if re.fullmatch(r"--?config", a) and i + 1 < len(argv):
            return argv[i + 1]
        m = re.fullmatch(r"--?config=(.*)", a)
        if m:
            return m.group(1)
    return default


def check_config_file(value: str) -> None:
    """Refuses a --config whose file does not exist or cannot be read, naming the configs that do exist
    (ml_collections would defer the error to the config's first use, as a traceback)."""
    path = value.split(":", 1)[0]
    if os.path.isfile(path) and os.access(path, os.R_OK):
        return
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    known = sorted(f"configs/{f}" for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    why = "is not readable" if os.path.exists(path) else "does not exist"
    raise UserError(f"--config={value}: the config file {path!r} {why}"
                    + (f"; the configs are {', '.join(known)}" if known else ""))


def unknown_config_override(argv) -> Optional[str]:
    """'--config.optim.lr=abc: unknown config field ...; did you mean ...' for the first `--config.x` override of
    argv that names no field of the config (loaded without overrides), or None."""
    from ettin_jax.sweep import missing_field, resolve_config
    value = config_argument(argv, None)
    overrides = [a for a in argv if re.match(r"--?(no)?config\.", a)]
    if value is None or not overrides:
        return None
    try:
        base = resolve_config(value, [])
    except Exception:  # the config itself does not load: its own error says more
        return None
    for flag in overrides:
        key = re.sub(r"^--?(no)?", "", flag.split("=", 1)[0])
        why = missing_field(base, re.sub(r"\[[^]]*\]", "", key))
        if why:
            return f"{flag}: {why}"
    return None


def define_config_flag(fv, default: str, argv, help_string: str):
    """DEFINE_config_file("config") in `fv`, reading overrides from argv, with its errors as UserErrors.

    When --config is not on the command line, ml_collections parses the default config and applies the overrides
    here, at definition; otherwise at parse time (`parse_flags`, whose errors go through `flag_error`).
    """
    from ml_collections import config_flags
    check_config_file(config_argument(argv, default))
    try:
        config_flags.DEFINE_config_file("config", default, help_string, lock_config=True, sys_argv=argv,
                                        flag_values=fv)
    except Exception as e:  # noqa: BLE001 - every error of a default config's parse is about the flags
        raise UserError(flag_error(e, [*argv, f"--config={default}"])) from None


# Errors whose message is already the one line a user needs (each module's own "bad input" class).
def _user_error_classes() -> tuple:
    classes = [UserError, flags.Error]
    for module, name in (("ettin_jax.train", "ConfigError"), ("ettin_jax.hf", "ConversionError"),
                         ("ettin_jax.sweep", "SweepError")):
        m = sys.modules.get(module)
        if m is not None and hasattr(m, name):
            classes.append(getattr(m, name))
    return tuple(classes)


OOM_HINT = ("the step does not fit in the device's memory: lower --config.micro_batch_size (gradient accumulation; "
            "global_batch_size stays) or --config.global_batch_size, set --config.model.remat=full (or dots), or "
            "shrink the run to this machine with the config argument runlocal "
            "(--config=configs/ettin.py:size=...,runlocal)")


def user_error(e: BaseException) -> Optional[str]:
    """One line for an error caused by the user's input or machine (a flag, a file, a full or read-only disk, a
    step too big for the device), or None for an internal error (a bug: that one deserves its traceback)."""
    text = str(e)
    # Orbax/TensorStore report a failed write as ValueError("... [os_error_code='28']"), naming the file;
    # safetensors as SafetensorError("... (os error 28)"), naming none.
    code = re.search(r"os_error_code='(\d+)'|\(os error (\d+)\)", text)
    code = int(code.group(1) or code.group(2)) if code else None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        where = re.search(r'(?:local file|Failed writing:) "([^"]+)"', text)
        return _os_error_line(code, where.group(1) if where else None)
    if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and (
            "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()):
        return f"out of device memory ({_first_line(e)[:200]}): {OOM_HINT}"
    if isinstance(e, _user_error_classes()):
        return _first_line(e) if not isinstance(e, flags.Error) else flag_error(e)
    if isinstance(e, OSError) and e.errno is not None:
        if e.filename2 and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # a copy: the target is at fault
            return _os_error_line(e.errno, e.filename2, e.strerror)
        return _os_error_line(e.errno, e.filename, e.strerror, e.filename2)
    if isinstance(e, OSError):  # e.g. safetensors' "No such device (os error 19)" on a folder named *.safetensors
        return f"cannot read or write a file: {_first_line(e)}"
    if type(e).__name__ == "SafetensorError":
        return f"not a complete safetensors file ({_first_line(e)}); re-download or re-export it"
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON ({e}); the file was cut short or edited by hand"
    return None


def _os_error_line(code: int, path=None, strerror=None, path2=None) -> str:
    where = f" {path!r}" if path else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk holding{where or ' the output'}: free some space, or pass a folder on " \
               "another disk (--workdir / --out)"
    if code == errno.EROFS:
        return f"cannot write{where}: the file system is read-only; pass a folder on a writable disk " \
               "(--workdir / --out)"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}; pass a folder you may write to, or a file you may read"
    if code == errno.ENOENT:
        return f"no such file or folder:{where or ' (unnamed)'}"
    target = f" -> {path2!r}" if path2 else ""
    return f"{strerror or os.strerror(code)}:{where}{target}"


def _after_failed_save(e: BaseException) -> bool:
    """Whether `e` is what TensorStore's leftover writes hit once a failed save has closed Orbax's event loop."""
    return isinstance(e, RuntimeError) and "Event loop is closed" in str(e)


class _DropReported(logging.Filter):
    """Orbax's save threads log, with a traceback, the exception that they then raise in the caller: a user error
    (a full or read-only disk) is reported there in one line, so its log copies (and asyncio's) are dropped."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not (user_error(exc) is not None or _after_failed_save(exc))


def _quiet_failed_saves():
    """Installs `_DropReported` and an unraisable hook that drops `_after_failed_save` errors (else each leftover
    write prints a traceback at exit)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropReported) for f in logger.filters):
            logger.addFilter(_DropReported())
    default = sys.unraisablehook
    if getattr(default, "__name__", "") != "_unraisable":
        def _unraisable(u):
            if not _after_failed_save(u.exc_value):
                default(u)
        sys.unraisablehook = _unraisable


def run_subcommand(name: str, argv) -> int:
    """Runs a subcommand's `main`: a user error that escapes it is one line and exit status 2; an internal error
    prints its traceback and then a one-line summary, with exit status 1."""
    _quiet_failed_saves()
    prog = f"ettin {name}"
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return module.main([prog] + list(argv), subcommand=name) or 0
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - the one place that decides between one line and a traceback
        line = user_error(e)
        if line is not None:
            print(f"{prog}: error: {line}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {_first_line(e)[:300]} (a bug: the traceback is above)",
              file=sys.stderr)
        return 1


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
    except Exception as e:  # noqa: BLE001 - flags.Error, and what ml_collections lets escape (KeyError, IOError)
        print(f"{prog}: error: {flag_error(e, argv)}; usage: {prog} {usage_line} (see `{prog} --help`)",
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
    # The module sees `ettin SUBCOMMAND` as its program name and its own flags after it.
    return run_subcommand(name, argv[2:])


if __name__ == "__main__":
    # `python -m ettin_jax.cli`: run the imported module's main, so that its UserError is the one the subcommands
    # raise (this file, run as __main__, is a second copy of the module).
    from ettin_jax import cli as _cli
    sys.exit(_cli.main())
