"""Batch-size warmup: bounded sizes, every drawn row trained exactly once whatever the host count, resumable."""
import json
import os
import sys

import numpy as np
import pytest

from ettin_jax import batch_warmup, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def test_sizes_are_bounded_multiples_ending_at_the_global_batch():
    s = batch_warmup.sizes(4608, start=16, num_sizes=8, unit=16)
    assert len(s) <= 8 and s[0] == 16 and s[-1] == 4608
    assert all(b % 16 == 0 for b in s) and s == sorted(set(s))
    assert batch_warmup.sizes(64, start=1, num_sizes=100, unit=16) == [16, 32, 48, 64]
    assert batch_warmup.granule(4608, 16, 8, micro_batch_size=0) == 16
    assert batch_warmup.granule(4608, 16, 8, micro_batch_size=96) == 96
    with pytest.raises(ValueError, match="multiple"):
        batch_warmup.sizes(100, start=1, num_sizes=4, unit=16)


def test_schedule_follows_ettins_warmup_rounded_down_to_a_size():
    sched = batch_warmup.Schedule(64, start=16, warmup_tokens=1e6, num_sizes=4, unit=16)
    assert sched.sizes == [16, 32, 48, 64]
    for t in np.linspace(0, 1.2e6, 97):
        n = int(optim.batch_size_warmup(float(t), start=16, end=64, warmup_tokens=1e6))  # one sequence at a time
        b = sched.size(t)
        assert b in sched.sizes and b <= max(n, 16) and n - b < 16
    assert sched.size(0) == 16 and sched.size(1e6) == 64


class FakeIterator:
    """Data batches of B rows whose tokens say (data step, global row); this host holds rows [h B/H, (h+1) B/H)."""

    def __init__(self, b, host, hosts, step=0):
        self.b, self.host, self.hosts, self.step = b, host, hosts, step

    def __next__(self):
        rows = np.arange(self.host * self.b // self.hosts, (self.host + 1) * self.b // self.hosts)
        tokens = np.stack([np.full(4, self.step * 1000 + r) for r in rows]).astype(np.int32)
        prov = {"rows": [{"row": int(r), "hash": f"{self.step}-{r}"} for r in rows]}
        out = dict(tokens=tokens, segment_ids=np.ones_like(tokens), positions=np.zeros_like(tokens),
                   step=self.step, provenance=prov)
        self.step += 1
        return out

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


def _feed(hosts, host, b=32, rows_per_group=4):
    return batch_warmup.RowFeed(FakeIterator(b, host, hosts), global_batch_size=b, rows_per_group=rows_per_group,
                                shard_index=host, shard_count=hosts)


def _ids(batch):
    return sorted(int(x) for x in batch["tokens"][:, 0])


def test_rows_are_taken_once_each_and_host_count_does_not_change_them():
    """G = 8 groups of 4 rows; steps of 8, 16, 24, 32, 32 rows (multiples of G) span data batches. One host and four
    hosts train the same rows at every step, and over the run every row of the first data batches exactly once."""
    steps = [8, 16, 24, 32, 32]
    one = _feed(1, 0)
    four = [_feed(4, h) for h in range(4)]
    seen = []
    for n in steps:
        a = _ids(one.take(n)[0])
        b = sorted(sum((_ids(f.take(n // 4)[0]) for f in four), []))
        assert a == b
        seen += a
    assert len(seen) == len(set(seen)) == sum(steps) == 112
    # 112 rows = data batches 0-2 whole and, of batch 3, the first 2 rows of each of the 8 groups of 4.
    want = {s * 1000 + r for s in range(3) for r in range(32)} | {3000 + 4 * g + i for g in range(8) for i in (0, 1)}
    assert set(seen) == want


def test_a_restored_feed_continues_with_the_same_rows():
    a = _feed(2, 1)
    a.take(4)
    a.take(12)  # mid data batch
    state = json.loads(json.dumps(a.get_state()))
    want = [_ids(a.take(n)[0]) for n in (8, 16)]
    b = _feed(2, 1)
    b.set_state(state)
    assert [_ids(b.take(n)[0]) for n in (8, 16)] == want


@pytest.mark.slow
def test_trainer_grows_the_batch_and_trains_every_drawn_row(tmp_path):
    """The trainer with a warmup over 3,000 tokens, batches of up to 16 x 64 on one device with 4 data streams
    (granule 4: sizes 4, 8, 12, 16): the steps grow, each step's provenance holds exactly its rows, no row is drawn
    twice or skipped, and a resume from a mid-warmup checkpoint (inside a data batch) equals the uninterrupted run."""
    import shutil
    from test_train import losses, small
    from ettin_jax import checkpoint, train
    from ettin_jax.data import provenance

    cfg = small(steps=10, **{"global_batch_size": 16, "data.num_streams": 4, "mesh.num_devices": 1,
                             "batch_size_warmup.tokens": 3000.0, "batch_size_warmup.num_sizes": 4, "keep_last": 10})
    logs = []
    train.train(cfg, str(tmp_path / "a"), log=logs.append)
    assert any("sizes [4, 8, 12, 16]" in line for line in logs), logs
    sizes, rows = [], []
    for step in range(10):
        rec = provenance.read_step(str(tmp_path / "a"), step)
        sizes.append(len(rec["rows"]))
        rows += [r["row"] for r in rec["rows"]]
    assert sizes[0] == 4 and sizes == sorted(sizes) and sizes[-1] == 16 and set(sizes) <= {4, 8, 12, 16}, sizes
    assert len(rows) == len(set(rows)) == sum(sizes)  # no row twice
    # Every row of the data batches wholly consumed was trained: nothing drawn and dropped.
    whole = sum(sizes) // 16
    assert set(range(whole * 16)) <= set(rows) and max(rows) < (whole + 1) * 16
    # Resume from step 4 (inside a data batch: sum of the first 4 sizes is no multiple of 16).
    assert sum(sizes[:4]) % 16
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for step in checkpoint.Checkpoints(str(tmp_path / "b"), async_save=False).steps():
        if step > 4:
            shutil.rmtree(tmp_path / "b" / "checkpoints" / str(step))
    resumed = []
    train.train(cfg, str(tmp_path / "b"), log=resumed.append)
    assert any(line.startswith("resumed from step 4") for line in resumed), resumed
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
