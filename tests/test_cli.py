"""The `ettin` command: dispatch, and the import/export subcommands' handling of bad input."""
import json
import os

import pytest
from safetensors.numpy import load_file, save_file

from ettin_jax import cli, hf


def test_help_and_unknown_subcommand(capsys):
    assert cli.main(["ettin", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "export", "import", "fill-mask", "generate", "tokenizer", "batches", "bench"):
        assert name in out
    assert cli.main(["ettin", "trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["train", "export", "import", "fill-mask", "generate", "bench", "tokenizer", "batches",
                                 "sweep", "sweep-report", "eval"])
def test_every_subcommand_answers_help_and_bad_flags(sub, capsys):
    assert cli.main(["ettin", sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ettin {sub} ") and "--" in out.split("\n", 1)[1]
    assert cli.main(["ettin", sub, "--no_such_flag=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_flag" in err and f"ettin {sub} --help" in err
    if sub != "tokenizer":  # the one subcommand with a positional argument (its action, `train`)
        assert cli.main(["ettin", sub, "stray"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "unexpected arguments stray" in err and f"usage: ettin {sub} " in err


def _hf_folder(path):
    from tests.test_hf import _hf_model
    _hf_model("decoder").save_pretrained(path)
    return path


def test_import_then_export_through_the_cli(tmp_path, capsys):
    src = _hf_folder(tmp_path / "hf")
    assert cli.main(["ettin", "import", f"--hf={src}", f"--workdir={tmp_path / 'w'}"]) == 0
    assert "--config.init_from=" in capsys.readouterr().out
    assert json.loads((tmp_path / "w" / "models.json").read_text()).keys() == {"decoder"}
    assert cli.main(["ettin", "export", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'out'}"]) == 0
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    a.pop("decoder.weight", None)
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
    # Exported as the other architecture (a cross-objective use of the weights).
    assert cli.main(["ettin", "export", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'enc'}",
                     "--as=encoder"]) == 0
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["model_type"] == "modernbert"


def test_import_of_a_broken_folder_writes_nothing(tmp_path, capsys):
    src = _hf_folder(tmp_path / "hf")
    capsys.readouterr()  # transformers' save progress bar
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.attn.k_proj.weight"] = sd["model.layers.1.attn.k_proj.weight"][:, :10].copy()
    save_file(sd, src / "model.safetensors")
    workdir = tmp_path / "w"
    assert cli.main(["ettin", "import", f"--hf={src}", f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one line
    assert "model.layers.1.attn.k_proj.weight has shape (64, 10), expected (64, 64)" in err
    assert not workdir.exists() and not any(p.name.startswith("w.") for p in tmp_path.iterdir())


def test_import_refuses_a_non_empty_workdir(tmp_path, capsys):
    src = _hf_folder(tmp_path / "hf")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "keep.txt").write_text("precious")
    assert cli.main(["ettin", "import", f"--hf={src}", f"--workdir={tmp_path / 'w'}"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "w" / "keep.txt").read_text() == "precious"


def test_export_of_a_missing_workdir(tmp_path, capsys):
    assert cli.main(["ettin", "export", f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'o'}"]) == 2
    assert "not an ettin workdir" in capsys.readouterr().err


def test_train_refuses_a_bucket_url_workdir(tmp_path, capsys, monkeypatch):
    """gs://B/x would become a local folder named 'gs:': refused before anything is written, naming the mount."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ettin", "train", "--workdir=gs://my-bucket/runs/demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket" in err
    assert not (tmp_path / "gs:").exists()
