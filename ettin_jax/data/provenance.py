"""Provenance: which documents formed each step's batch, written into the workdir, and `ettin batches`.

`ProvenanceWriter(workdir)` appends each step's record (one JSON line: step, host, and for each row its pieces
[source, doc_id, token_start, token_end] and its hash) to `provenance/host_IIIII/steps_XXXXXX.jsonl`, one file per
`steps_per_file` steps. Token offsets are into the document's tokens without [CLS]/[SEP], end exclusive; a document
over `max_doc_chars` is tokenized in parts (its doc_id ends in `#partN`) and its offsets still count from the
document's first token, in the parts' tokens one after another. A resumed run rewrites from its first step: on its
first write into a file the writer drops the lines of that step and after (written before the preemption, past the
restored checkpoint), so no step appears twice.

    ettin batches --workdir=DIR --step=N     # the documents of step N's batch and its hash (all hosts merged)
"""
import json
import os
import sys

from absl import flags

from ettin_jax.data.pipeline import batch_hash

class ProvenanceWriter:
    """Appends per-step provenance records under `workdir/provenance/`."""

    def __init__(self, workdir, steps_per_file: int = 1000):
        self.root = os.path.join(os.fspath(workdir), "provenance")
        self.steps_per_file = steps_per_file
        self._checked = set()

    def _path(self, step, host):
        first = step - step % self.steps_per_file
        return os.path.join(self.root, f"host_{host:05d}", f"steps_{first:06d}.jsonl")

    def write(self, batch_or_record: dict):
        """Writes the record of one step (a batch dict from the pipeline, or its `provenance` entry)."""
        rec = batch_or_record.get("provenance", batch_or_record)
        step, host = int(rec["step"]), int(rec["shard_index"])
        path = self._path(step, host)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if path not in self._checked:
            self._checked.add(path)
            if os.path.exists(path):
                # Lines at or after this step were written by a run that was later rolled back: drop them.
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line)["step"] < step]
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(keep)
                os.replace(tmp, path)
        with open(path, "a") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def flush(self):
        """Records are written line by line; nothing is buffered (kept for symmetry with other writers)."""


def read_step(workdir, step: int, steps_per_file: int = 1000) -> dict:
    """The merged record of `step` from every host's files: rows in global order and the global batch hash."""
    root = os.path.join(os.fspath(workdir), "provenance")
    if not os.path.isdir(root):
        raise ValueError(f"{root} does not exist: was the run started with provenance on?")
    first = step - step % steps_per_file
    rows, hosts = [], []
    for host in sorted(os.listdir(root)):
        path = os.path.join(root, host, f"steps_{first:06d}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec["step"] == step:
                    rows += rec["rows"]
                    hosts.append(rec["shard_index"])
    if not rows:
        raise ValueError(f"no provenance for step {step} under {root}")
    rows.sort(key=lambda r: r["row"])
    return {"step": step, "hosts": sorted(hosts), "rows": rows, "hash": batch_hash([r["hash"] for r in rows])}


USAGE = "--workdir=DIR --step=N [--json]"


def main(argv, subcommand=None):
    """`ettin batches --workdir=DIR --step=N`; returns the exit status (--help: 0; a bad flag: one line, 2)."""
    del subcommand
    prog = argv[0] if argv else "ettin batches"
    from ettin_jax import cli
    FLAGS = flags.FlagValues()  # private: made when the command runs, never on import
    flags.DEFINE_string("workdir", None, "the run's workdir (holds provenance/)", flag_values=FLAGS)
    flags.DEFINE_integer("step", None, "the step whose batch to print", flag_values=FLAGS)
    flags.DEFINE_bool("json", False, "print the merged record as JSON", flag_values=FLAGS)
    rest = cli.parse_flags(FLAGS, argv, USAGE)
    if isinstance(rest, int):
        return rest
    if FLAGS.workdir is None or FLAGS.step is None:
        print(f"{prog}: error: --workdir and --step are required; usage: {prog} {USAGE}", file=sys.stderr)
        return 2
    try:
        rec = read_step(FLAGS.workdir, FLAGS.step)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {cli.user_error(e) or e}", file=sys.stderr)
        return 2
    if FLAGS.json:
        print(json.dumps(rec, indent=1))
        return 0
    print(f"step {rec['step']}  hash {rec['hash']}  rows {len(rec['rows'])}  hosts {rec['hosts']}")
    for row in rec["rows"]:
        pieces = ", ".join(f"{src}:{doc}[{a}:{b}]" for src, doc, a, b in row["pieces"])
        print(f"  row {row['row']:5d}  {row['hash']}  {pieces}")
    return 0
