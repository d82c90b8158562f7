"""The tutorial notebooks: committed executed, from the committed code, and still running cleanly.

Each notebook is executed once, in a scratch copy (the committed file is never touched), by the
same function ``make notebooks`` uses (``tutorials/run_notebooks.py``).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
_spec = importlib.util.spec_from_file_location("run_notebooks", TUTORIALS / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)

NOTEBOOKS = run_notebooks.notebooks()
EXPECTED = ["01-quickstart", "02-which-word-looks-where", "03-is-the-answer-grounded",
            "04-combine-and-check", "05-your-own-checkpoint", "06-how-are-images-and-text-aligned",
            "07-inside-the-model", "08-finding-a-shortcut"]
MAX_KB = 400  # committed notebooks stay small enough to read on the repository page


def _figures(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def test_the_tutorials_are_the_notebooks():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    assert [p.name for p in TUTORIALS.glob("*.py")] == ["run_notebooks.py"]  # no .py tutorials left
    readme = (TUTORIALS.parent / "README.md").read_text()
    for name in EXPECTED:
        assert f"tutorials/{name}.ipynb" in readme


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_come_from_committed_code(path):
    notebook = nbformat.read(path, as_version=4)
    stamp = notebook.metadata.get(run_notebooks.METADATA_KEY, {}).get("code_sha256")
    assert stamp == run_notebooks.code_hash(notebook), (
        f"{path.name}: its outputs were made by other code than it holds; run `make notebooks`")
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells), "every code cell was executed"
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1)), "in order"
    assert run_notebooks.problems(notebook) == []
    assert _figures(notebook) >= 2
    assert notebook.cells[-1].cell_type == "markdown" and "do not" in notebook.cells[-1].source
    assert path.stat().st_size < MAX_KB * 1024


def test_code_hash_sees_a_changed_code_cell_but_not_outputs_or_prose():
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    before = run_notebooks.code_hash(notebook)
    code = next(c for c in notebook.cells if c.cell_type == "code")
    markdown = next(c for c in notebook.cells if c.cell_type == "markdown")
    code.outputs, markdown.source = [], markdown.source + " more prose"
    assert run_notebooks.code_hash(notebook) == before
    code.source += "\nx = 1"
    assert run_notebooks.code_hash(notebook) != before


def test_problems_finds_errors_stderr_and_warnings():
    cell = nbformat.v4.new_code_cell("pass")
    notebook = nbformat.v4.new_notebook(cells=[cell])
    assert run_notebooks.problems(notebook) == []
    outputs = [
        nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[]),
        nbformat.v4.new_output("stream", name="stderr", text="Loading weights: 100%"),
        nbformat.v4.new_output("stream", name="stdout", text="x.py:3: UserWarning: careful"),
        nbformat.v4.new_output("stream", name="stdout", text="all fine"),
    ]
    cell.outputs = outputs
    found = run_notebooks.problems(notebook)
    assert len(found) == 3
    assert "ValueError: bad" in found[0] and "stderr" in found[1] and "warning" in found[2]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors_or_warnings(path, tmp_path):
    scratch = tmp_path / path.name
    shutil.copy(path, scratch)
    executed = run_notebooks.execute(scratch, out=scratch)
    assert run_notebooks.problems(executed) == []
    assert _figures(executed) == _figures(nbformat.read(path, as_version=4))
    assert executed.metadata[run_notebooks.METADATA_KEY]["code_sha256"] == run_notebooks.code_hash(
        nbformat.read(path, as_version=4))
