"""Clear the outputs of notebooks before committing them: ``python notebooks/clear_outputs.py``.

With no arguments it clears every notebook in this folder. Cell ids, sources and notebook
metadata stay as they were, so the diff shows only what was edited.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def clear(path: Path) -> bool:
    """Clear one notebook's outputs, execution counts and timings; True if anything changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
        if cell.metadata.pop("execution", None) is not None:  # run timings, added by nbclient
            changed = True
    if notebook.metadata.pop("widgets", None) is not None:
        changed = True
    if changed:
        nbformat.write(notebook, path)
    return changed


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for path in paths:
        if clear(path):
            print(f"cleared {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
