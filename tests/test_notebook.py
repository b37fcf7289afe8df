"""notebooks/quickstart.ipynb executes top to bottom (headless, nbclient), so that it never rots."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits this environment: one CPU device (not the suite's 8), a short run, no network.
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("ETTIN_QUICKSTART_STEPS", "10")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "nothing to install" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the loss plot is missing"
    assert "transformers fill-mask:" in text and "transformers greedy generate:" in text
    # The export read back by transformers gives the same answers as ettin_jax (printed, not just shown).
    assert "same top-1 as ettin_jax: True" in text and "same tokens as ettin_jax: True" in text
    for arch in ("encoder", "decoder"):
        folder = tmp_path / "runs" / "quickstart" / "hf" / arch
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
