"""The example notebooks execute from top to bottom (they import only the public API)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(HERE) if f.endswith(".ipynb"))


def test_there_are_four_notebooks():
    assert NOTEBOOKS == ["audit_your_model.ipynb", "molecular_study.ipynb", "quickstart.ipynb", "synthetic_study.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(os.path.join(HERE, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
