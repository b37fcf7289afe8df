"""Batch-size warmup that trains on every row it draws, with a bounded number of compiled shapes.

Ettin (ModernBERT's recipe) grows the batch one sequence per device at a time, from the micro-batch size to the
full batch, over `batch_size_warmup.tokens` tokens (`optim.batch_size_warmup`). Here the schedule's size is rounded
down to one of `batch_size_warmup.num_sizes` sizes, evenly spaced from the start size to the global batch and each a
multiple of a granule (so every shape divides the mesh, the micro-batches and the hosts), so the step compiles at most
`num_sizes` times. A step of size b takes the next b rows of the data stream (`RowFeed`): rows are never drawn and
discarded, and the learning rate counts exactly the tokens trained.

The stream of rows. The pipeline's batch of data step p holds B rows, cut into G = gcd(B, num_streams) groups of
whole rows; host h of H holds G/H whole groups (`data.pipeline`). Each host takes its rows of a data batch
round-robin over its groups, and every size is a multiple of G, so after any number of steps each group has given
the same number of rows, whichever the host count: the rows trained are a function of (data config, seed, steps)
alone, as the batches are without warmup. A training step may span two data batches.
"""
from __future__ import annotations

import copy
import math

import grain
import numpy as np

from ettin_jax import optim

# Per-row batch fields; the rest of a pipeline batch (step, provenance) is per data batch.
ROW_FIELDS = ("tokens", "segment_ids", "positions", "mlm_inputs", "mlm_positions", "mlm_labels", "mlm_weights")


def granule(global_batch_size: int, num_streams: int, data_parallel: int, micro_batch_size: int = 0) -> int:
    """The multiple every warmup size is: divides into the data groups, the data-parallel devices and the
    micro-batches."""
    groups = math.gcd(global_batch_size, num_streams)
    return math.lcm(groups, micro_batch_size or data_parallel, data_parallel)


def sizes(global_batch_size: int, start: int, num_sizes: int, unit: int) -> list[int]:
    """The batch sizes a warmup uses: up to `num_sizes` multiples of `unit`, evenly spaced from `start` (rounded up
    to `unit`) to the global batch, which is always the last."""
    if global_batch_size % unit:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of {unit} (the data groups, the "
                         "data-parallel devices and the micro-batch size)")
    first = min(global_batch_size, max(unit, -(-max(start, 1) // unit) * unit))
    k = max(1, int(num_sizes))
    out = {global_batch_size}
    for i in range(k):
        b = first + (global_batch_size - first) * i / max(1, k - 1)
        out.add(max(first, int(b // unit) * unit))
    return sorted(out)


class Schedule:
    """The batch size of a step, from the tokens trained before it."""

    def __init__(self, global_batch_size: int, start: int, warmup_tokens: float, num_sizes: int, unit: int):
        self.global_batch_size, self.start, self.warmup_tokens = global_batch_size, max(1, start), warmup_tokens
        self.sizes = sizes(global_batch_size, self.start, num_sizes, unit)

    def size(self, tokens_seen: float) -> int:
        n = int(optim.batch_size_warmup(float(tokens_seen), start=min(self.start, self.global_batch_size),
                                        end=self.global_batch_size, warmup_tokens=self.warmup_tokens))
        below = [b for b in self.sizes if b <= n]
        return below[-1] if below else self.sizes[0]


class RowFeed(grain.DatasetIterator):
    """This host's rows of the data stream, taken a training step at a time (`take`); checkpointable.

    Its state is the data iterator's state *before* the data batch it is in, plus how many of that batch's rows
    were taken: a restore replays that batch and skips them.
    """

    def __init__(self, data_iter, *, global_batch_size: int, rows_per_group: int, shard_index: int,
                 shard_count: int):
        super().__init__()
        self._it = data_iter
        self.global_batch_size = global_batch_size
        host_rows = global_batch_size // shard_count
        local_groups = host_rows // rows_per_group
        j = np.arange(host_rows)
        self._order = (j % local_groups) * rows_per_group + j // local_groups  # round-robin over the groups
        self._first_row = shard_index * host_rows
        self._shard_count = shard_count
        self._before = copy.deepcopy(self._it.get_state())
        self._batch, self._taken = None, 0

    def _next_batch(self):
        # A copy: an iterator's state may share containers with its live streams, which the next batch changes.
        self._before = copy.deepcopy(self._it.get_state())
        self._batch, self._taken = next(self._it), 0

    def take(self, rows: int) -> tuple[dict, list[dict], int]:
        """(batch of `rows` host rows, their provenance rows, the data step of the first) from the stream."""
        parts, prov, first_step = [], [], None
        while rows > 0:
            if self._batch is None or self._taken == len(self._order):
                self._next_batch()
            n = min(rows, len(self._order) - self._taken)
            idx = self._order[self._taken:self._taken + n]
            b = self._batch
            parts.append({k: b[k][idx] for k in ROW_FIELDS if k in b})
            step = int(b["step"])
            first_step = step if first_step is None else first_step
            if b.get("provenance") is not None:
                by_row = b["provenance"]["rows"]
                for i in idx:
                    r = dict(by_row[i])
                    r["data_step"], r["row"] = step, step * self.global_batch_size + self._first_row + int(i)
                    prov.append(r)
            self._taken += n
            rows -= n
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return batch, prov, first_step

    def __next__(self):
        raise TypeError("RowFeed is read with take(rows)")

    def get_state(self) -> dict:
        return {"data_iter": self._before, "taken": self._taken if self._batch is not None else 0}

    def set_state(self, state: dict):
        self._it.set_state(state["data_iter"])
        self._before, self._batch, self._taken = copy.deepcopy(state["data_iter"]), None, 0
        if state["taken"]:
            self._next_batch()
            self._taken = int(state["taken"])
