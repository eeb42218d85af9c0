"""benchmarks/run_notebook.py: a notebook's set-up cells and chosen sections executed in a real kernel."""
import json
import subprocess
import sys

import nbformat
import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "run_notebook.py"


@pytest.fixture
def notebook(tmp_path):
    cells = [nbformat.v4.new_markdown_cell("# A notebook"),
             nbformat.v4.new_code_cell("import os\nx = 2\nprint('set up', os.environ.get('FEDGAN_PRESET'))",
                                       metadata={"tags": ["setup"]}),
             nbformat.v4.new_markdown_cell("## 1. One"),
             nbformat.v4.new_code_cell("print('one', x)"),
             nbformat.v4.new_markdown_cell("## 2. Two"),
             nbformat.v4.new_code_cell("print('two', x * 21)"),
             nbformat.v4.new_markdown_cell("## Reading"),
             nbformat.v4.new_code_cell("print('reading')")]
    cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="kept\n")]
    path = tmp_path / "small.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO)


def stdout(cell):
    """A cell's printed text (a file keeps it as a list of lines, as Jupyter writes it)."""
    return "".join("".join(o["text"]) for o in cell.get("outputs", []) if o.get("name") == "stdout")


def test_a_section_runs_after_the_set_up_cells_and_the_other_cells_keep_their_outputs(notebook, tmp_path):
    done = run(notebook, "--sections", 2, "--preset", "smoke", "--out", tmp_path / "out.ipynb")
    assert done.returncode == 0, done.stderr
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    assert stdout(cells[1]) == "set up smoke\n" and stdout(cells[5]) == "two 42\n"
    assert stdout(cells[3]) == "kept\n" and stdout(cells[7]) == ""  # not run: as they were
    assert cells[3] == json.loads(notebook.read_text())["cells"][3]  # to the byte, as Jupyter writes a cell
    record, = json.loads((tmp_path / "out.ipynb").read_text())["metadata"]["fedgan_runs"]
    assert record["sections"] == [2] and record["preset"] == "smoke" and len(record["cells"]) == 2
    assert record["seconds"] > 0 and record["device"]
    again = run(tmp_path / "out.ipynb", "--in-place")  # every code cell, onto the notebook itself
    assert again.returncode == 0, again.stderr
    written = json.loads((tmp_path / "out.ipynb").read_text())
    assert stdout(written["cells"][3]) == "one 2\n" and stdout(written["cells"][7]) == "reading\n"
    assert [r["sections"] for r in written["metadata"]["fedgan_runs"]] == [[2], "all"]


def test_nothing_is_overwritten_or_written_half(notebook, tmp_path):
    (tmp_path / "taken.ipynb").write_text("mine")
    refused = run(notebook, "--out", tmp_path / "taken.ipynb")
    assert refused.returncode == 2 and "exists" in refused.stderr and (tmp_path / "taken.ipynb").read_text() == "mine"
    unknown = run(notebook, "--sections", 7, "--out", tmp_path / "new.ipynb")
    assert unknown.returncode and "sections [1, 2]" in unknown.stderr and not (tmp_path / "new.ipynb").exists()
    broken = nbformat.read(notebook, as_version=4)
    broken.cells[5].source = "raise RuntimeError('cell two failed')"
    nbformat.write(broken, notebook)
    failed = run(notebook, "--sections", 2, "--out", tmp_path / "new.ipynb")
    assert failed.returncode and "cell two failed" in failed.stderr and not (tmp_path / "new.ipynb").exists()


def test_figures_are_drawn_into_the_notebook_whatever_the_shell_set_and_none_is_lost(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as benchmarks/gpu_notebook.sh exports it: a kernel with it draws nothing
    drawing = nbformat.read(notebook, as_version=4)
    drawing.cells[5].source = "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"
    nbformat.write(drawing, notebook)
    done = run(notebook, "--sections", 2, "--out", tmp_path / "out.ipynb")
    assert done.returncode == 0, done.stderr
    drawn = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[5]
    assert any("image/png" in output.get("data", {}) for output in drawn.outputs)
    drawing = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    drawing.cells[5].source = "print('no figure now')"  # a cell that had one and draws none: refused
    nbformat.write(drawing, tmp_path / "out.ipynb")
    lost = run(tmp_path / "out.ipynb", "--sections", 2, "--out", tmp_path / "again.ipynb")
    assert lost.returncode and "cells [5] had a figure and drew none" in lost.stderr
    assert not (tmp_path / "again.ipynb").exists()
