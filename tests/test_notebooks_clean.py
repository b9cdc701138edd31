"""The analyst notebooks are committed clean and are executed by the test suite.

Outputs in a committed notebook go stale, bloat diffs and can carry data that should not leave an
analyst's machine, so every notebook is stored without them: run
``python notebooks/clear_outputs.py`` before committing. ``make test`` runs them (pytest's
``--nbmake``, configured in ``pyproject.toml``), so they cannot rot either.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = {
    "01_train_and_inspect.ipynb",
    "02_choose_threshold.ipynb",
    "03_blocking.ipynb",
    "04_privacy_tradeoff.ipynb",
}


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_analyst_notebooks_are_there() -> None:
    assert {path.name for path in notebooks()} >= EXPECTED


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if (cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")))
        or "execution" in cell.get("metadata", {})
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs; run `python notebooks/clear_outputs.py`"
    )
    assert "widgets" not in notebook.metadata, f"{path.name}: widget state is an output too"
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", path.name


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_renders_charts_offline(path: Path) -> None:
    # Splink's to_html() and a chart's plain display load vega from a CDN, which county
    # networks and CI cannot reach; nbhelpers.show inlines it.
    source = "\n".join(
        cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
    )
    assert not re.search(r"\.to_html\(\s*\)", source), f"{path.name}: to_html() loads a CDN"
    assert "cdn." not in source.lower(), path.name


def test_make_test_executes_the_notebooks() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--nbmake" in config["addopts"].split()
    assert "notebooks" in config["testpaths"]


def test_notebooks_are_json_with_stable_cell_ids() -> None:
    # Stable ids keep diffs small when a notebook is edited and cleared again.
    for path in notebooks():
        data = json.loads(path.read_text(encoding="utf-8"))
        ids = [cell.get("id") for cell in data["cells"]]
        assert all(ids) and len(set(ids)) == len(ids), path.name
