"""Replays Ettin's released batch order: data-order Parquet files with columns `input_ids` and `step`.

Ettin published, per checkpoint interval, folders (checkpoint_XXXXXX/, ext_XXXXXX/, decay_XXXXXX/) of files such as
`steps_000001_to_000100.parquet`; each row is one sequence (a single [CLS] ... [SEP] chunk, no packing) and `step`
says which optimizer step's batch it belongs to. Step numbers restart per phase, so point `replay_path` at one
phase's folders. Iterator step n is the file step `first_step + n` (`first_step` defaults to the smallest step in
the files), so `Pipeline.iterator(0).next()` is the first released batch.
"""
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from etils import epath

from ettin_jax.data import sources as sources_lib


class ReplayReader:
    """Random access to the sequences of each step of a data-order Parquet folder tree."""

    def __init__(self, paths, first_step: int = -1):
        files = []
        for p in paths:
            ep = epath.Path(p)
            files += [f for f in sources_lib.walk_files(p) if f.endswith(".parquet")] if ep.is_dir() else [str(p)]
        if not files:
            raise ValueError(f"replay: no .parquet files under {paths}")
        self.files, self.ranges = [], []
        for f in files:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "input_ids" not in names or "step" not in names:
                raise ValueError(f"replay file {f} must have columns input_ids and step (has {names})")
            steps = pf.read(columns=["step"]).column("step")
            if len(steps) == 0:
                continue
            mm = pc.min_max(steps)
            self.files.append(f)
            self.ranges.append((int(mm["min"].as_py()), int(mm["max"].as_py())))
        if not self.files:
            raise ValueError(f"replay: the parquet files under {paths} hold no rows")
        self.first_step = min(lo for lo, _ in self.ranges) if first_step < 0 else first_step
        self.last_step = max(hi for _, hi in self.ranges)
        self._cached = (None, None)

    def _table(self, f):
        if self._cached[0] != f:
            table = pq.read_table(f, columns=["input_ids", "step"])
            steps = table.column("step").to_numpy()
            order = np.argsort(steps, kind="stable")  # rows keep their file order within a step
            bounds = {}
            sorted_steps = steps[order]
            uniq, starts = np.unique(sorted_steps, return_index=True)
            ends = list(starts[1:]) + [len(order)]
            for s, a, b in zip(uniq, starts, ends):
                bounds[int(s)] = order[a:b]
            self._cached = (f, (table.column("input_ids"), bounds))
        return self._cached[1]

    def rows(self, n: int):
        """The sequences (list of int arrays) of iterator step n, in file order."""
        step = self.first_step + n
        for f, (lo, hi) in zip(self.files, self.ranges):
            if lo <= step <= hi:
                ids, bounds = self._table(f)
                if step in bounds:
                    return [np.asarray(ids[int(i)].as_py(), np.int64) for i in bounds[step]]
        raise IndexError(f"replay: no rows for step {step} (files cover steps {self.first_step}..{self.last_step})")
