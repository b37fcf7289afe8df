"""`ettin bench`: the synthetic batch, the JSON line, and bad flags."""
import json

import numpy as np
import pytest

from ettin_jax import bench, cli, sizes


def test_synthetic_batch_is_a_consistent_mlm_batch():
    cfg = sizes.model_config("tiny")
    b = bench.synthetic_batch(cfg, 3, 100, mlm_rate=0.3)
    assert b["tokens"].shape == b["mlm_inputs"].shape == (3, 100)
    assert b["mlm_positions"].shape == (3, 30) and (b["tokens"][:, 0] == cfg.cls_token_id).all()
    k = b["mlm_weights"] > 0
    assert k.sum() == 3 * 30
    rows = np.arange(3)[:, None]
    assert (b["mlm_inputs"][rows, b["mlm_positions"]] == cfg.mask_token_id).all()
    assert (b["mlm_labels"] == b["tokens"][rows, b["mlm_positions"]]).all()
    assert bench.predictions_per_step("mlm", b) == 90 and bench.predictions_per_step("clm", b) == 3 * 99


def _run(capsys, *args):
    rc = cli.main(["ettin", "bench", *args])
    return rc, capsys.readouterr()


@pytest.mark.slow  # ~8 s on a quiet machine (compile + the matmul peak), 30 s on a loaded one
def test_bench_prints_json_last_line(capsys):
    rc, out = _run(capsys, "--config=configs/ettin.py:size=tiny,objective=mlm", "--config.seq_len=64",
                   "--config.global_batch_size=2", "--config.model.dtype=float32", "--config.model.vocab_size=512",
                   "--steps=1", "--warmup=0", "--noforward", "--json")
    assert rc == 0, out.err
    r = json.loads(out.out.strip().splitlines()[-1])
    t = r["train"]
    assert r["batch"] == 2 and r["seq_len"] == 64 and r["objective"] == "mlm"
    assert t["tokens_per_s"] > 0 and t["step_time_s"] > 0 and 0 < t["mfu"] < 1.5
    assert t["peak_bytes"] > 0 and r["peak_rss_bytes"] > 0
    assert "train" in out.err  # the human-readable lines go to stderr with --json


@pytest.mark.slow
def test_bench_paired_times_both_forwards(capsys):
    rc, out = _run(capsys, "--config=configs/ettin.py:size=tiny,objective=paired", "--config.seq_len=256",
                   "--config.global_batch_size=2", "--config.model.dtype=float32", "--config.model.vocab_size=512",
                   "--steps=2", "--warmup=1")
    assert rc == 0, out.err
    assert "forward encoder" in out.out and "forward decoder" in out.out and "MFU" in out.out


def test_bench_rejects_bad_flags(capsys):
    rc, out = _run(capsys, "--steps=0")
    assert rc == 2 and "--steps=0" in out.err
    rc, out = _run(capsys, "--nonsense=1")
    assert rc == 2 and "usage: ettin bench" in out.err
    rc, out = _run(capsys, "--config=configs/ettin.py:size=huge")
    assert rc != 0
