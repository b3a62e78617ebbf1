"""examples/warehouse.ipynb runs end to end in a fresh kernel of this interpreter; any cell that
raises fails the test (nbclient's CellExecutionError)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "warehouse.ipynb"
KERNEL = "nwh-tests"


@pytest.fixture()
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec that starts this interpreter (the project's environment), found before any
    `python3` kernel installed elsewhere on the machine."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "neuron warehouse tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's warehouse lands here
    return KERNEL


def outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == kind]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_end_to_end(kernel, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=180, allow_errors=False,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert not outputs(nb, "error")
    shown = [o["data"] for o in outputs(nb, "execute_result") + outputs(nb, "display_data")]
    texts = "\n".join(d.get("text/plain", "") for d in shown)
    assert "demo" in texts and "Neuron(run='demo'" in "".join(
        o.get("text", "") for o in outputs(nb, "stream")) + texts
    assert any("image/png" in d for d in shown), "the plot cell drew no figure"
    # the run went into the notebook's own temporary warehouse, and nowhere else
    (warehouse,) = tmp_path.glob("nwh-notebook-*/warehouse")
    assert (warehouse / "runs" / "demo" / "run.json").exists()
