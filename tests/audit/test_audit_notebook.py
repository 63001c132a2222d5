"""docs/audit.ipynb runs top to bottom offline (it trains its own tiny real run first)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "docs",
                        "audit.ipynb")


@pytest.mark.slow
def test_audit_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(str(o.get("text", "")) for cell in notebook.cells
                      if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "ledger loaded (schema + sha256 ok): True" in outputs
    assert "ε lower bound" in outputs
