"""examples/unmasking_a_vanilla_rnn.ipynb runs top to bottom in a fresh, headless kernel."""
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="the test extra: pip install -e '.[test]'")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "unmasking_a_vanilla_rnn.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_headless(tmp_path, monkeypatch):
    """Every cell runs without an error (nbclient raises CellExecutionError, naming the cell), as
    a student's fresh kernel would run it: without the tests' Triton interpreter switch. (About a
    minute on 2 quiet cores; the per-cell timeout only guards against a hang.)"""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.monotonic()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"notebook: {time.monotonic() - start:.0f} s")
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # the cell, unrolled, units, gradients, gradients by cell
