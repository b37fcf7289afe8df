"""The trainer: determinism, resume after SIGKILL, phases, cross-objective, NaN guard, bad configs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ettin_jax import checkpoint, recipe, sizes, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))


def small(objective="paired", phase="pretrain", steps=4, **kw):
    """The demo config shrunk to seconds: 2 layers x 64 wide, 8 x 64 tokens."""
    import demo
    c = demo.get_config()
    c.objective = objective
    c.phase = phase
    if phase != "pretrain":
        recipe.apply_phase(c, phase)
    c.model.update(num_layers=2, hidden_size=64, intermediate_size=64, num_heads=1)
    c.global_batch_size, c.seq_len, c.total_steps, c.total_tokens = 8, 64, steps, 0.0  # total_steps: the budget
    c.log_every_steps, c.checkpoint_every_steps, c.checkpoint_every_tokens = 1, 2, 0.0
    c.data.num_streams = 8
    for k, v in kw.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def test_a_run_stopped_by_bad_data_resumes_with_the_bad_data_settings_changed(tmp_path):
    """After a refusal mid-run (a corrupt shard, too many skips), the same workdir resumes with on_bad_sample,
    max_skip_fraction or verify_hashes changed; a field that changes the batches is still refused."""
    checkpoint.write_json(str(tmp_path), "config.json", train.config_to_dict(small("mlm")))
    for key, value in (("data.on_bad_sample", "skip"), ("data.max_skip_fraction", 0.5),
                       ("data.verify_hashes", False)):
        train.check_resume_config(str(tmp_path), small("mlm", **{key: value}), allow_change=False)
    with pytest.raises(train.ConfigError, match="data.max_row_wait"):
        train.check_resume_config(str(tmp_path), small("mlm", **{"data.max_row_wait": 4}), allow_change=False)


def opt_counts(workdir):
    """The update counts in the optimizer state of a workdir's latest checkpoint."""
    import orbax.checkpoint as ocp
    ck = checkpoint.Checkpoints(str(workdir), async_save=False)
    state = ck.manager.restore(ck.steps()[-1], args=ocp.args.Composite(opt_state=ocp.args.StandardRestore()))
    ck.close()
    leaves = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    return {int(x) for p, x in leaves if "count" in jax.tree_util.keystr(p)}


def initial_params(config):
    """The parameters a run of `config` starts from (before its first step), as the trainer makes them."""
    from ettin_jax import sharding
    models = train.model_configs(config)
    mesh = sharding.make_mesh(config.mesh)
    tx, _ = train.make_optimizer(config)
    with jax.set_mesh(mesh):
        params, _ = train.init_state(models, config, mesh, tx, sharding.rules(config), log=lambda *_: None)
    return params


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def losses(workdir, key="loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {d["step"]: d[key] for d in map(json.loads, f)}


@pytest.mark.slow
def test_same_command_twice_gives_identical_losses(tmp_path):
    train.train(small(), str(tmp_path / "a"), log=lambda *_: None)
    train.train(small(), str(tmp_path / "b"), log=lambda *_: None)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 4 and a == b  # bitwise
    assert set(checkpoint.load_models(str(tmp_path / "a"))) == {"encoder", "decoder"}


@pytest.mark.slow
def test_paired_run_trains_both_on_the_same_batches(tmp_path):
    logs = []
    out = train.train(small(steps=2), str(tmp_path), log=logs.append)
    assert "encoder/loss" in out and "decoder/loss" in out and out["tokens_per_sec"] > 0
    rec = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rec] == [1, 2]
    for r in rec:
        assert r["encoder/tokens"] == r["decoder/tokens"]  # one batch, two models
        assert r["loss"] == pytest.approx(r["encoder/loss"] + r["decoder/loss"])
    # Resuming a finished run does nothing and keeps the record.
    train.train(small(steps=2), str(tmp_path), log=logs.append)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2]


def _run_cli(workdir, extra=(), **popen):
    cmd = [sys.executable, "-m", "ettin_jax.cli", "train", "--config=configs/demo.py", f"--workdir={workdir}",
           "--config.model.num_layers=2", "--config.model.hidden_size=64", "--config.model.intermediate_size=64",
           "--config.model.num_heads=1", "--config.global_batch_size=8", "--config.seq_len=64",
           "--config.total_steps=12", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
           "--config.data.num_streams=8", *extra]
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


@pytest.mark.slow
def test_resume_after_sigkill_logs_the_same_losses(tmp_path):
    full = _run_cli(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stdout.read().decode()[-3000:]
    killed = _run_cli(tmp_path / "killed")
    kill_after = np.random.default_rng(int(time.time())).integers(4, 10)
    path = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        # After a committed checkpoint (step 3's save is asynchronous: a kill before it lands restarts from 0).
        committed = (tmp_path / "killed" / "checkpoints" / "3").is_dir()
        if committed and path.exists() and len(path.read_text().splitlines()) >= kill_after:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    killed.wait(timeout=60)
    resumed = _run_cli(tmp_path / "killed")
    out = resumed.stdout.read().decode()
    assert resumed.wait(timeout=600) == 0, out[-3000:]
    assert "resumed from step" in out
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 13))
    assert a == b  # the steps after the resume point log exactly the uninterrupted losses


@pytest.mark.slow
def test_phases_and_both_cross_objective_directions(tmp_path):
    log = lambda *_: None
    p1 = str(tmp_path / "p1")
    train.train(small("paired", "pretrain", steps=2), p1, log=log)
    p2 = str(tmp_path / "p2")
    c2 = small("paired", "extension", steps=2, init_from=p1)
    assert c2.init_mode == "full" and c2.mlm_rate == 0.3 and c2.model.global_rope_theta == 160_000.0
    c2.seq_len = 128
    train.train(c2, p2, log=log)
    # The optimizer state continued: its step count is the sum of both phases.
    params = checkpoint.Checkpoints(p2, async_save=False).restore(2).get("params")
    assert set(params) == {"encoder", "decoder"}
    assert opt_counts(p1) == {2} and opt_counts(p2) == {4}
    # A paired run continues as a single objective: the encoder's weights and optimizer state carry over.
    p2_mlm = str(tmp_path / "p2_mlm")
    c2_mlm = small("mlm", "extension", steps=2, init_from=p1)
    c2_mlm.seq_len = 128
    train.train(c2_mlm, p2_mlm, log=log)
    assert set(checkpoint.load_models(p2_mlm)) == {"encoder"} and opt_counts(p2_mlm) == {4}
    c3 = small("paired", "decay", steps=2, init_from=p2)
    assert c3.mlm_rate == 0.15 and c3.init_mode == "full"
    c3.seq_len = 128
    train.train(c3, str(tmp_path / "p3"), log=log)
    assert opt_counts(str(tmp_path / "p3")) == {6}
    msgs = []
    enc = small("mlm", "cross", steps=2, init_from=str(tmp_path / "p3"))
    assert enc.init_mode == "weights"
    train.train(enc, str(tmp_path / "enc_from_dec"), log=msgs.append)
    assert any("the encoder starts from the decoder's weights" in m for m in msgs)
    dec = small("clm", "cross", steps=2, init_from=str(tmp_path / "p3"))
    train.train(dec, str(tmp_path / "dec_from_enc"), log=msgs.append)
    assert any("the decoder starts from the encoder's weights" in m for m in msgs)
    # Cross-objective runs start with a fresh optimizer, from the other architecture's final weights.
    assert opt_counts(str(tmp_path / "enc_from_dec")) == {2} and opt_counts(str(tmp_path / "dec_from_enc")) == {2}
    p3_final = checkpoint.Checkpoints(str(tmp_path / "p3"), async_save=False).restore(2)["params"]
    for cfg, arch, source in ((enc, "encoder", "decoder"), (dec, "decoder", "encoder")):
        start = initial_params(cfg)[arch]
        assert_trees_equal(start, p3_final[source])
    mntp = small("mntp", "cross", steps=2, init_from=str(tmp_path / "p3"))
    out = train.train(mntp, str(tmp_path / "mntp"), log=log)
    assert np.isfinite(out["encoder/loss"])
    # The cross-objective encoder's first loss is far below a fresh model's (it starts from trained weights).
    p3_dec = checkpoint.load_model_from_workdir(str(tmp_path / "p3"), "decoder")[0]
    e0 = checkpoint.load_model_from_workdir(str(tmp_path / "enc_from_dec"), "encoder", step=2)[0]
    assert jax.tree_util.tree_structure(p3_dec) == jax.tree_util.tree_structure(e0)


@pytest.mark.slow
def test_nan_stops_with_last_good_checkpoint_intact(tmp_path):
    c = small("mlm", steps=6, **{"optimizer.peak_lr": 1e30, "checkpoint_every_steps": 1})
    c.schedule.warmup_tokens = 1.0
    with pytest.raises(RuntimeError, match=r"non-finite loss or gradient at step (\d+).*last good checkpoint is step"):
        train.train(c, str(tmp_path), log=lambda *_: None)
    steps = checkpoint.Checkpoints(str(tmp_path), async_save=False).steps()
    assert steps and max(steps) < 6
    params = checkpoint.load_model_from_workdir(str(tmp_path), "encoder")[0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_nan_skip_policy_keeps_going(tmp_path):
    c = small("clm", steps=3, nonfinite="skip", **{"optimizer.peak_lr": 1e30})
    c.schedule.warmup_tokens = 1.0
    msgs = []
    train.train(c, str(tmp_path), log=msgs.append)
    assert any("step skipped" in m for m in msgs)
    params = checkpoint.load_model_from_workdir(str(tmp_path), "decoder")[0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
    train.train(small("clm", steps=1), str(tmp_path), log=lambda *_: None)
    other = small("clm", steps=2, **{"optimizer.peak_lr": 1e-4})
    with pytest.raises(train.ConfigError, match=r"different config \(optimizer.peak_lr: 0.003 -> 0.0001"):
        train.train(other, str(tmp_path), log=lambda *_: None)
    train.train(other, str(tmp_path), allow_config_change=True, log=lambda *_: None)
    assert sorted(losses(tmp_path)) == [1, 2]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    train.train(small("clm", steps=4), str(tmp_path), log=lambda *_: None)
    ckdir = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [2, 4]
    for root, _, files in os.walk(ckdir / "4" / "params"):
        for f in files:
            open(os.path.join(root, f), "wb").close()  # truncate every file: unreadable
    msgs = []
    train.train(small("clm", steps=6), str(tmp_path), log=msgs.append)
    assert any("checkpoint 4" in m and "could not be read" in m for m in msgs)
    assert any("resumed from step 2" in m for m in msgs)
    assert max(losses(tmp_path)) == 6


@pytest.mark.parametrize("override, message", [
    (dict(size="2b"), "unknown size '2b'"),
    (dict(objective="seq2seq"), "unknown objective 'seq2seq'"),
    (dict(phase="warmup"), "unknown phase 'warmup'"),
    ({"model.num_heads": 3}, "hidden_size 64 is not divisible by num_heads 3"),
    (dict(seq_len=10000), "seq_len 10000 is above max_position_embeddings 8192"),
    (dict(global_batch_size=6), "global_batch_size 6 is not divisible by data x fsdp = 8 x 1 = 8"),
    ({"mesh.data": 3}, "mesh .* has 3 devices, but 8 are available"),
])
def test_bad_configs_fail_before_compiling(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train.train(small(**override), str(tmp_path), log=lambda *_: None)
    # Nothing is written: a refused config (a bad mesh, say) leaves the workdir free for the fixed command.
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_gradient_accumulation_and_remat_give_the_same_losses(tmp_path):
    """Micro-batches (strided, normalised by the whole batch's count) and rematerialisation change nothing."""
    two = {"mesh.num_devices": 2}  # micro-batches of 2 rows split over 2 data shards
    train.train(small("paired", steps=3, **two), str(tmp_path / "base"), log=lambda *_: None)
    train.train(small("paired", steps=3, micro_batch_size=2, **two), str(tmp_path / "accum"), log=lambda *_: None)
    train.train(small("paired", steps=3, **{"model.remat": "full"}, **two), str(tmp_path / "remat"),
                log=lambda *_: None)
    ref = losses(tmp_path / "base")
    for run in ("accum", "remat"):
        for key in ("encoder/loss", "decoder/loss"):
            got, want = losses(tmp_path / run, key), losses(tmp_path / "base", key)
            for step in want:
                assert got[step] == pytest.approx(want[step], rel=1e-5), (run, key, step)
    assert ref  # three logged steps


# ------------------------------------------------------------------------------------------- run length, schedule


class _Crash(Exception):
    pass


def _crash_at(step, msgs):
    def log(msg):
        msgs.append(msg)
        if msg.split()[:2] == ["step", str(step)]:
            raise _Crash(msg)
    return log


@pytest.mark.slow
def test_a_token_budget_ends_the_run_where_the_schedule_ends(tmp_path):
    """The run ends at total_tokens non-pad tokens (padded rows need more steps than the budget / row capacity), the
    LR has reached its final fraction there, and a crashed run resumes to end at the same step with the same losses.
    The crashed run kept its data statistics (written with each checkpoint), and every logged step carries the hash
    of the global batch the pipeline made for it."""
    short = tmp_path / "short.jsonl"  # documents of 40-60 tokens: one per unpacked row, the rest padding
    rng = np.random.default_rng(0)
    words = open(os.path.join(REPO, "data/corpus/austen.jsonl")).read(20000).split()
    with open(short, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(words[i * 60:i * 60 + int(rng.integers(40, 60))])}) + "\n")
    budget = 3 * 8 * 64
    cfg = lambda: small("mlm", steps=0, total_tokens=float(budget), **{
        "data.packing": False, "data.sources": [dict(name="short", format="jsonl", path=str(short), weight=1.0)]})
    a = str(tmp_path / "a")
    train.train(cfg(), a, log=lambda *_: None)
    seen = losses(a, "tokens_seen")
    last = max(seen)
    assert seen[last] >= budget > seen[last - 1] and last > 3  # padded rows: more than 3 steps' capacity
    tx, schedule = train.make_optimizer(cfg())
    o, s = cfg().optimizer, cfg().schedule
    assert float(schedule(seen[last])) == pytest.approx(s.final_frac * o.peak_lr, rel=1e-6)
    assert float(schedule(seen[last - 1])) > s.final_frac * o.peak_lr

    b, msgs = str(tmp_path / "b"), []
    with pytest.raises(_Crash):
        train.train(cfg(), b, log=_crash_at(3, msgs))  # after the checkpoint of step 2
    assert json.load(open(os.path.join(b, "data_stats.json")))["rows"] >= 16
    msgs = []
    train.train(cfg(), b, log=msgs.append)
    assert any("resumed from step 2" in m for m in msgs)
    assert losses(b) == losses(a) and max(losses(b)) == last
    # The data counts went on from the checkpoint (they are in the data iterator's state), not from zero.
    assert json.load(open(os.path.join(b, "data_stats.json"))) == json.load(open(os.path.join(a, "data_stats.json")))

    from ettin_jax import data
    c = cfg()
    pipe = data.make_pipeline(c.data, seq_len=c.seq_len, global_batch_size=c.global_batch_size, seed=c.seed,
                              mlm_rate=c.mlm_rate)
    it = pipe.iterator(0)
    want = {step + 1: next(it)["provenance"]["hash"] for step in range(last)}
    assert losses(a, "batch_hash") == want


def test_the_batch_hash_is_the_global_batchs_on_any_host_count(monkeypatch):
    """Two hosts each hash their own rows; the logged hash gathers the row hashes in global row order, so it equals
    the one-host run's hash of the same step."""
    from jax.experimental import multihost_utils
    from ettin_jax import data
    c = small("mlm")
    make = lambda i, n: data.make_pipeline(c.data, seq_len=c.seq_len, global_batch_size=c.global_batch_size,
                                           seed=c.seed, mlm_rate=c.mlm_rate, shard_index=i, shard_count=n)
    one = next(make(0, 1).iterator(0))["provenance"]
    hosts = [[r["hash"] for r in next(make(i, 2).iterator(0))["provenance"]["rows"]] for i in range(2)]
    as_array = lambda hashes: np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(len(hashes), -1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([as_array(h) for h in hosts]))
    assert train.global_batch_hash(hosts[0]) == one["hash"]


def test_every_runlocal_config_validates():
    """Every size x objective x phase shrinks to a consistent CPU run (the schedule fits its token budget)."""
    import ettin
    for size in sizes.SIZES:
        for objective in recipe.OBJECTIVES:
            for phase in recipe.PHASES:
                c = ettin.get_config(f"size={size},objective={objective},phase={phase},runlocal")
                if phase != "pretrain":
                    c.init_from = "runs/previous-phase"
                train.validate_config(c)
                assert c.total_tokens <= 20 * c.global_batch_size * c.seq_len


def test_a_schedule_longer_than_the_run_is_a_config_error():
    import ettin
    c = ettin.get_config("size=17m,objective=paired,phase=cross")
    c.init_from, c.total_tokens = "runs/previous-phase", 5e9
    with pytest.raises(train.ConfigError, match=r"config.schedule \(warmup_stable_decay over a horizon of "
                                                r"5,000,000,000 tokens, config.total_tokens\): .*warmup_tokens "
                                                r"\+ decay_tokens = 13000000000.0 exceeds"):
        train.validate_config(c)


@pytest.mark.parametrize("arg, message", [
    ("size=2b", "unknown size '2b'; expected one of 17m, 32m, 68m, 150m, 400m, 1b, tiny"),
    ("objective=seq2seq", "unknown objective 'seq2seq'; expected one of mlm, clm, mntp, paired"),
    ("phase=warmup", "unknown phase 'warmup'; expected one of pretrain, extension, decay, cross"),
])
def test_unknown_config_argument_is_one_line_and_status_2(tmp_path, capsys, arg, message):
    from ettin_jax import cli
    argv = ["ettin", "train", f"--config={REPO}/configs/ettin.py:{arg}", f"--workdir={tmp_path / 'run'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------- continuing an imported model


def _hf_folder_with_its_own_tokenizer(path):
    """A tiny random ModernBERT encoder whose tokenizer has its special tokens after the vocabulary, at 300..304
    (as ModernBERT's are at 50280..50284), unlike the bundled BPE's 0..4."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import ModernBertConfig, ModernBertForMaskedLM
    texts = [json.loads(line)["text"][:2000] for line in open(os.path.join(REPO, "data/corpus/austen.jsonl"))][:50]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    os.makedirs(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    assert ids["[CLS]"] >= 256
    ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        pad_token_id=ids["[PAD]"], cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"], bos_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"], max_position_embeddings=1024, local_attention=128)).save_pretrained(path)
    return path


@pytest.mark.slow
def test_an_imported_model_trains_only_with_its_own_tokenizer(tmp_path):
    from ettin_jax import hf
    imported = hf.import_hf(_hf_folder_with_its_own_tokenizer(str(tmp_path / "hf")), str(tmp_path / "imported"))
    assert os.path.exists(os.path.join(imported, "tokenizer", "tokenizer.json"))
    # The README's mistake: the bundled 8192-token BPE (special ids 0..4) under the imported model.
    c = small("mlm", steps=2, init_from=imported, init_mode="weights", **{"model.vocab_size": 8192})
    with pytest.raises(train.ConfigError) as e:
        train.train(c, str(tmp_path / "wrong"), log=lambda *_: None)
    msg = str(e.value)
    for part in ("vocab_size 320 there but 8192 here", "cls_token_id 301 there but 1 here",
                 "mask_token_id 304 there but 4 here",
                 f"--config.data.tokenizer={imported}/tokenizer --config.model.vocab_size=320"):
        assert part in msg, msg
    assert not os.path.exists(tmp_path / "wrong" / "checkpoints")
    # The fix the message names trains.
    c = small("mlm", steps=2, init_from=imported, init_mode="weights",
              **{"model.vocab_size": 320, "data.tokenizer": f"{imported}/tokenizer", "data.special_ids": {}})
    out = train.train(c, str(tmp_path / "right"), log=lambda *_: None)
    assert np.isfinite(out["encoder/loss"]) and max(losses(tmp_path / "right")) == 2


@pytest.mark.slow
def test_a_step_larger_than_the_device_memory_is_refused_before_the_first_batch(tmp_path, capsys, monkeypatch):
    """The trainer compiles its step first and compares the compiler's peak per device with the device's memory:
    here a device said to hold 1 MiB refuses the demo-sized step in one line naming the figures and the knobs, exit
    status 2, and no step runs (no metrics). With the real memory the same run trains."""
    from ettin_jax import cli
    from ettin_jax import compile as compile_lib
    monkeypatch.setattr(compile_lib, "hbm_bytes", lambda device: 2 ** 20)
    argv = ["ettin", "train", "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
            "--config.model.num_layers=2", "--config.model.hidden_size=64", "--config.model.intermediate_size=64",
            "--config.model.num_heads=1", "--config.global_batch_size=8", "--config.seq_len=64",
            "--config.total_steps=1", "--config.mesh.num_devices=1"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert cli.main(argv) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "GiB per device" in err and "has 0.00 GiB" in err
    for knob in ("micro_batch_size", "global_batch_size", "remat", "runlocal"):
        assert knob in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
