"""Bad input to every `ettin` subcommand: one line on stderr naming the value or file, exit status 2, no traceback.

Quick tests run the CLI in-process; the read-only and full disks are real (a tmpfs mounted in a private mount
namespace, `unshare -rm`), so those run as subprocesses and are marked slow.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from ettin_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.num_layers=2", "--config.model.hidden_size=64", "--config.model.intermediate_size=64",
        "--config.model.num_heads=1", "--config.global_batch_size=8", "--config.seq_len=64",
        "--config.total_steps=4", "--config.checkpoint_every_steps=2", "--config.data.num_streams=8"]


def one_line(capsys, argv, status=2) -> str:
    """Runs `ettin ARGV` in-process; asserts the exit status and a single stderr line without a traceback."""
    assert cli.main(["ettin", *argv]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ------------------------------------------------------------------------------------------------ flags and configs


@pytest.mark.parametrize("argv, expected", [
    (["--config.optim.lr=abc"], ["--config.optim.lr=abc: unknown config field 'config.optim'",
                                 "did you mean 'config.optimizer'?"]),
    (["--config=configs/demo.py", "--config.optim.lr=abc"], ["unknown config field 'config.optim'",
                                                             "did you mean 'config.optimizer'?"]),
    (["--config.total_step=5"], ["--config.total_step=5: unknown config field 'config.total_step'",
                                 "did you mean 'config.total_steps'"]),
    (["--config=configs/ettin.py:size=tiny", "--config.optimizer.lr=1"],
     ["unknown config field 'config.optimizer.lr'; config.optimizer has ", "peak_lr"]),
    (["--config.optimizer.peak_lr=abc"], ["flag --config.optimizer.peak_lr=abc: could not convert string to float"]),
    (["--config=configs/nope.py"], ["--config=configs/nope.py: the config file 'configs/nope.py' does not exist",
                                    "configs/demo.py, configs/ettin.py"]),
    (["--config", "configs/nope.py"], ["the config file 'configs/nope.py' does not exist"]),
    (["--config=configs/ettin.py:sise=tiny"], ["unknown config argument 'sise'"]),
])
@pytest.mark.parametrize("sub", ["train", "bench"])
def test_config_flag_errors_are_one_line(sub, argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "w"
    err = one_line(capsys, [sub, *([f"--workdir={workdir}"] if sub == "train" else []), *argv])
    assert err.startswith(f"ettin {sub}: error: ")
    for text in expected:
        assert text in err
    assert err.count("could not convert") <= 1  # once, not twice
    assert not workdir.exists()


def test_sweep_names_the_nearest_field(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    err = one_line(capsys, ["sweep", "--config=configs/demo.py", "--sweep=lr", f"--workdir_root={tmp_path}",
                            "--dry_run", "--config.total_step=5"])
    assert "unknown config field 'config.total_step'; did you mean 'config.total_steps'" in err


# ------------------------------------------------------------------------------------- damaged Hugging Face folders


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tests.test_hf import _hf_model
    path = tmp_path_factory.mktemp("hf") / "decoder"
    _hf_model("decoder").save_pretrained(path)
    shutil.copy(os.path.join(REPO, "data", "tokenizer", "tokenizer.json"), path)
    return path


def _damaged(src, dst, name, how):
    shutil.copytree(src, dst)
    path = dst / name
    data = path.read_bytes()
    if how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "100 bytes":
        path.write_bytes(data[:100])
    elif how == "last byte missing":
        path.write_bytes(data[:-1])
    elif how == "a folder":
        path.unlink()
        path.mkdir()
    elif how == "missing":
        path.unlink()
    return path


DAMAGE = [
    ("model.safetensors", "half", "is not a complete safetensors file (Error while deserializing header"),
    ("model.safetensors", "100 bytes", "(100 bytes) is not a complete safetensors file"),
    ("model.safetensors", "last byte missing", "is not a complete safetensors file"),
    ("model.safetensors", "a folder", "(not a file) is not a complete safetensors file"),
    ("config.json", "half", "config.json is not valid JSON"),
    ("config.json", "missing", "config.json is missing"),
    ("tokenizer.json", "half", "tokenizer.json is not valid JSON"),
]


@pytest.mark.parametrize("name, how, expected", DAMAGE)
def test_import_of_a_damaged_folder_is_one_line(name, how, expected, hf_folder, tmp_path, capsys):
    src = tmp_path / "hf"
    path = _damaged(hf_folder, src, name, how)
    err = one_line(capsys, ["import", f"--hf={src}", f"--workdir={tmp_path / 'w'}"])
    assert expected in err and (str(path) in err or how == "missing")
    assert not (tmp_path / "w").exists()


def test_import_of_a_missing_folder(tmp_path, capsys):
    err = one_line(capsys, ["import", f"--hf={tmp_path / 'nope'}", f"--workdir={tmp_path / 'w'}"])
    assert f"'{tmp_path / 'nope'}' is not a folder" in err


@pytest.mark.parametrize("sub, name, expected", [
    ("generate", "model.safetensors", "is not a complete safetensors file"),
    ("fill-mask", "tokenizer.json", "tokenizer.json is not valid JSON"),
])
def test_inference_on_a_damaged_folder_is_one_line(sub, name, expected, hf_folder, tmp_path, capsys):
    src = tmp_path / "hf"
    path = _damaged(hf_folder, src, name, "half")
    text = "--prompt=hello" if sub == "generate" else "--text=a [MASK] b"
    err = one_line(capsys, [sub, f"--model={src}", text])
    assert expected in err and str(path) in err


def test_train_with_a_damaged_tokenizer_folder(hf_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    tok = tmp_path / "tok"
    shutil.copytree(os.path.join(REPO, "data", "tokenizer"), tok)
    data = (tok / "tokenizer.json").read_bytes()
    (tok / "tokenizer.json").write_bytes(data[:5000])
    err = one_line(capsys, ["train", f"--workdir={tmp_path / 'w'}", *TINY, f"--config.data.tokenizer={tok}"])
    assert f"{tok / 'tokenizer.json'} is not a readable tokenizer.json (EOF while parsing" in err
    assert not (tmp_path / "w").exists()


def test_export_of_a_workdir_with_a_damaged_models_json(hf_folder, tmp_path, capsys):
    assert cli.main(["ettin", "import", f"--hf={hf_folder}", f"--workdir={tmp_path / 'w'}"]) == 0
    (tmp_path / "w" / "models.json").write_text('{"decoder": {')
    capsys.readouterr()
    err = one_line(capsys, ["export", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}"])
    assert f"{tmp_path / 'w' / 'models.json'} is not valid JSON" in err


@pytest.mark.parametrize("argv, expected", [
    (["tokenizer", "train", "--input=/nonexistent/x.txt", "--out=OUT"], "input '/nonexistent/x.txt' does not exist"),
    (["batches", "--workdir=/nonexistent/w", "--step=1"], "/nonexistent/w/provenance does not exist"),
])
def test_missing_inputs_exit_2(argv, expected, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "t")) for a in argv]
    assert expected in one_line(capsys, argv)


# -------------------------------------------------------------------------- what escapes: out of memory, internal bugs


def test_an_out_of_memory_step_names_the_knobs(tmp_path, capsys, monkeypatch):
    """An XLA RESOURCE_EXHAUSTED that escapes the trainer (the config itself is never run here)."""
    import jax
    from ettin_jax import train

    def oom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 82879949432 bytes.")

    monkeypatch.setattr(train, "train", oom)
    err = one_line(capsys, ["train", f"--workdir={tmp_path / 'w'}"])
    assert "out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating 82879949432 bytes.)" in err
    for knob in ("--config.micro_batch_size", "--config.global_batch_size", "--config.model.remat", "runlocal"):
        assert knob in err


def test_an_internal_error_keeps_its_traceback_and_ends_with_one_line(tmp_path, capsys, monkeypatch):
    from ettin_jax import hf

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(hf, "import_hf", bug)
    assert cli.main(["ettin", "import", f"--hf={tmp_path}", f"--workdir={tmp_path / 'w'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and len(err) > 3
    assert err[-1] == ("ettin import: internal error: TypeError: unsupported operand type(s) for +: 'int' and "
                       "'NoneType' (a bug: the traceback is above)")


@pytest.mark.parametrize("error, expected", [
    (OSError(30, "Read-only file system", "/ro/w"), "cannot write '/ro/w': the file system is read-only"),
    (OSError(28, "No space left on device", "/src/tokenizer.json", None, "/full/w/tokenizer.json"),
     "no space left on the disk holding '/full/w/tokenizer.json'"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "x/0" in OCDBT database at local file "/full/w/checkpoints/2.'
                'orbax-checkpoint-tmp/": Failed to write 578047 bytes to file 12: No space left on device '
                "[os_error_code='28']"), "no space left on the disk holding '/full/w/checkpoints/2.orbax-checkpoint"),
    (PermissionError(13, "Permission denied", "/etc/w"), "permission denied: '/etc/w'"),
    (ValueError("a plain bug"), None),
])
def test_user_error_lines(error, expected):
    """A full disk's error is not mistaken for an out-of-memory step (both say RESOURCE_EXHAUSTED)."""
    line = cli.user_error(error)
    assert line == expected if expected is None else expected in line
    assert line is None or "device memory" not in line


# ------------------------------------------------------------------------------------ real read-only and full disks


def _can_mount():
    try:
        return subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _on_mounted_tmpfs(options, target, argv):
    """`ettin ARGV` in a private mount namespace where `target` is a tmpfs mounted with `options`."""
    os.makedirs(target, exist_ok=True)
    script = f'mount -t tmpfs -o {options} tmpfs "$1" && shift && exec "$@"'
    cmd = ["unshare", "-rm", "sh", "-c", script, "sh", str(target), sys.executable, "-m", "ettin_jax.cli", *argv]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs `unshare -rm` (user and mount namespaces) to mount a tmpfs")
@pytest.mark.parametrize("disk, expected", [("ro,size=1m", "the file system is read-only"),
                                            ("size=1200k", "no space left on the disk holding")])
@pytest.mark.parametrize("sub", ["train", "import", "export"])
def test_read_only_and_full_workdirs(sub, disk, expected, hf_folder, tmp_path):
    """1200k holds the tokenizer and the metrics but not the first checkpoint (train), nor the imported or exported
    weights: the save fails mid-way, in Orbax's background threads, and is still one line."""
    mnt = tmp_path / "mnt"
    if sub == "train":
        argv = ["train", f"--workdir={mnt / 'w'}", *TINY]
    elif sub == "import":
        argv = ["import", f"--hf={hf_folder}", f"--workdir={mnt / 'w'}"]
    else:
        assert cli.main(["ettin", "import", f"--hf={hf_folder}", f"--workdir={tmp_path / 'w'}"]) == 0
        argv = ["export", f"--workdir={tmp_path / 'w'}", f"--out={mnt / 'o'}"]
    r = _on_mounted_tmpfs(disk, mnt, argv)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"ettin {sub}: "), r.stderr[-3000:]
    assert expected in r.stderr and str(mnt) in r.stderr


def test_export_to_a_full_disk_names_the_file_and_leaves_nothing(hf_folder, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as "... (os error 28)", naming no file: the exporter names it."""
    import safetensors.numpy
    from safetensors import SafetensorError

    assert cli.main(["ettin", "import", f"--hf={hf_folder}", f"--workdir={tmp_path / 'w'}"]) == 0
    capsys.readouterr()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    err = one_line(capsys, ["export", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}"])
    assert f"no space left on the disk holding '{tmp_path / 'o.tmp' / 'model.safetensors'}'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
