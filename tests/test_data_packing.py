"""Tests of Ettin's chunking rules and the best-fit packer."""
import numpy as np
import pytest

from ettin_jax.data import chunking, packing


def test_chunk_spans_follow_ettins_rules():
    assert chunking.chunk_spans(10, 128) == ([], 1)  # 12 tokens < 32: dropped
    assert chunking.chunk_spans(30, 128) == ([(0, 30)], 0)
    assert chunking.chunk_spans(126, 128) == ([(0, 126)], 0)
    spans, dropped = chunking.chunk_spans(300, 128)
    assert dropped == 0 and spans == [(0, 126), (126, 252), (174, 300)]  # tail back-filled to full length
    assert all(e - s + 2 == 128 for s, e in spans)
    assert chunking.chunk_spans(260, 128, backfill=False) == ([(0, 126), (126, 252)], 1)
    c = chunking.make_chunk(np.arange(10, 20), 2, 5, cls_id=1, sep_id=2)
    np.testing.assert_array_equal(c, [1, 12, 13, 14, 2])


def test_packer_rows_fit_and_state_roundtrip():
    rng = np.random.default_rng(0)
    lengths = rng.integers(32, 257, size=2000)
    p = packing.BestFitPacker(256, 16, 32)
    rows = []
    for i, n in enumerate(lengths[:1000]):
        p.add((i, 0, 0), int(n))
        while (r := p.pop()) is not None:
            rows.append(r)
    state = p.get_state()
    q = packing.BestFitPacker(256, 16, 32)
    q.set_state(state, lambda key: int(lengths[key[0]]))
    for i, n in enumerate(lengths[1000:], start=1000):
        for pk in (p, q):
            pk.add((i, 0, 0), int(n))
        a, b = p.pop(), q.pop()
        while a is not None:
            assert a == b
            rows.append(a)
            a, b = p.pop(), q.pop()
        assert b is None
    used = [sum(int(lengths[k[0]]) for k in r) for r in rows]
    assert max(used) <= 256
    assert sorted(k[0] for r in rows for k in r) == sorted(set(k[0] for r in rows for k in r))
    assert sum(used) / (256 * len(rows)) > 0.9  # uniform 32..256 at 256 is a hard case


@pytest.mark.slow
def test_grain_packer_efficiency_for_reference():
    """Why packing.py does not use Grain's packers: on Ettin-style chunks they flush bins part-empty."""
    import grain
    rng = np.random.default_rng(0)
    # Ettin-style: long documents give full 1024-token chunks, short ones anything from 32 up.
    lengths = np.where(rng.random(3000) < 0.5, 1024, rng.integers(32, 1024, size=3000))
    ds = grain.MapDataset.source([{"tokens": np.ones(int(n), np.int32)} for n in lengths]).to_iter_dataset()
    packed = grain.experimental.FirstFitPackIterDataset(ds, length_struct={"tokens": 1024}, num_packing_bins=64,
                                                        shuffle_bins=False)
    real = total = 0
    for row in packed:
        real += int((row["tokens_segment_ids"] > 0).sum())
        total += 1024
    grain_eff = real / total
    p = packing.BestFitPacker(1024, 64, 32)
    rows = []
    for i, n in enumerate(lengths):
        p.add(i, int(n))
    rows = list(p.ready) + [keys for _, keys, _ in p.open]
    ours = lengths.sum() / (1024 * len(rows))
    assert ours > 0.98 and ours > grain_eff + 0.02, (ours, grain_eff)


def _waits(lengths, num_open_rows, max_wait):
    """Per chunk: how many rows later than the one its stream was making when it came it leaves (the stream pops
    every closed row before it adds the next chunk, as pipeline.py's streams do)."""
    p = packing.BestFitPacker(1024, num_open_rows, 32, max_wait=max_wait)
    made, added_at, waits = 0, {}, []
    for i, n in enumerate(lengths):
        added_at[i] = made
        p.add(i, int(n))
        while (row := p.pop()) is not None:
            waits += [made - added_at.pop(k) for k in row]
            made += 1
    return waits, added_at  # added_at: the chunks still open at the end


@pytest.mark.parametrize("max_wait", [1, 8, 32])
def test_no_chunk_waits_longer_than_the_bound(max_wait):
    """packing.py's bound: a chunk added while its stream makes row r leaves in a row <= r + 2 * max_wait + 2."""
    rng = np.random.default_rng(max_wait)
    # Mostly long chunks that rarely fit together, some short ones: rows stay open (the small-pool case).
    lengths = np.where(rng.random(5000) < 0.3, rng.integers(32, 100, 5000), rng.integers(400, 900, 5000))
    waits, still_open = _waits(lengths, 64, max_wait)
    assert max(waits) <= 2 * max_wait + 2, (max_wait, max(waits))
    assert min(still_open) >= len(lengths) - max_wait - 1  # the chunks open at the end came in the last max_wait
    unbounded, _ = _waits(lengths, 64, 0)
    assert max(unbounded) > 1000  # without the bound some chunk waits over a thousand rows
