"""notebooks/walkthrough.ipynb runs top to bottom (nbclient, CPU) and the committed copy has no outputs.

The execution test is slow (analysis, plots, conversion and a short distillation of the demo
model: a few minutes on two CPU cores); run it with ``pytest -m slow tests/test_notebook.py``.
Without the demo pipeline it runs on the random-weight ``tiny-pixart`` instead, which checks the
code but not the demo's numbers.
"""
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip outputs before committing"


@pytest.mark.slow
def test_walkthrough_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from attnprobe.demo import DEMO_DIR

    model = "demo" if (DEMO_DIR / "model_index.json").is_file() else "tiny-pixart"
    monkeypatch.setenv("WALKTHROUGH_MODEL", model)
    monkeypatch.setenv("WALKTHROUGH_DIR", str(tmp_path / "walkthrough"))
    monkeypatch.setenv("WALKTHROUGH_DISTIL_STEPS", os.environ.get("WALKTHROUGH_DISTIL_STEPS", "10"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    run = tmp_path / "walkthrough" / "run"
    assert (run / "erf.json").is_file() and (run / "report.html").is_file()
    assert (run / "figures" / "gradient_erf.png").is_file()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # four report figures, the comparison, the gradient ERF
