"""Execute a notebook, or some of its sections, in a real Jupyter kernel (nbclient) and write it with the outputs.

A notebook's set-up cells (code cells tagged "setup") run first; then the code cells of the sections asked for (a
section: from a markdown line "## N." to the next line starting "## "), or every code cell. Only the cells run get
new outputs: the others keep theirs, so a notebook can be committed from runs of its sections made apart (on a
GPU lent for a few minutes at a time; with the cells' store, `fu.CellStore`, a section cut short trains only what
it had not finished when run again). The notebook's metadata gains a line a run: cells, preset, device, wall time.
The kernel draws figures into the notebook as Jupyter's does, whatever MPLBACKEND the shell set, and a run in which
a cell that had a figure draws none writes nothing.

    python benchmarks/run_notebook.py FedGAN_Custom_sync_strategy.ipynb --preset cpu --sections 9 --in-place
    python benchmarks/run_notebook.py FedGAN_Custom_sync_strategy.ipynb --preset full --out executed.ipynb

Needs nbclient and ipykernel (requirements.txt); benchmarks/gpu_session.sh brings them to a machine without.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"## (\d+)\.")
INLINE = "module://matplotlib_inline.backend_inline"  # Jupyter's: figures go into the cells' outputs


def section_of_cells(notebook: nbformat.NotebookNode) -> list[int | None]:
    """The section number each cell is in (None before the first numbered heading)."""
    section, sections = None, []
    for cell in notebook.cells:
        headings = [line for line in cell.source.splitlines() if line.startswith("## ")]
        if cell.cell_type == "markdown" and headings:  # the cell's last heading goes on to the cells after it
            numbered = HEADING.match(headings[-1])
            section = int(numbered.group(1)) if numbered else None
        sections.append(section)
    return sections


def chosen_cells(notebook: nbformat.NotebookNode, sections: list[int] | None) -> list[int]:
    """Indexes of the code cells to run, in the notebook's order: set-up cells, then the sections' (or all)."""
    where = section_of_cells(notebook)
    known = {s for s in where if s is not None}
    unknown = sorted(set(sections or ()) - known)
    if unknown:
        raise SystemExit(f"--sections {unknown}: the notebook has sections {sorted(known)}")
    return [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and (
        sections is None or "setup" in cell.metadata.get("tags", ()) or where[i] in sections)]


def figures(cell: nbformat.NotebookNode) -> int:
    """The images among a code cell's outputs."""
    return sum(any(kind.startswith("image/") for kind in output.get("data", {})) for output in cell.get("outputs", []))


def device_name() -> str:
    """The GPU the kernel's default device `auto` picks, else "cpu"."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def execute(path: Path, sections: list[int] | None, preset: str | None) -> tuple[nbformat.NotebookNode, dict]:
    """The notebook with the chosen cells executed, and a record of the run."""
    notebook = nbformat.read(path, as_version=4)
    indexes = chosen_cells(notebook, sections)
    part = copy.deepcopy(notebook)
    part.cells = [part.cells[i] for i in indexes]
    if preset:
        os.environ["FEDGAN_PRESET"] = preset
    os.environ["MPLBACKEND"] = INLINE  # the kernel inherits it: Agg (a script's usual choice) would draw nothing
    started = time.perf_counter()
    client = NotebookClient(part, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute()
    except CellExecutionError as error:
        raise SystemExit(f"{path.name}: a cell failed; nothing written\n{error}") from None
    seconds = time.perf_counter() - started
    lost = [i for i, cell in zip(indexes, part.cells) if figures(notebook.cells[i]) and not figures(cell)]
    if lost:
        raise SystemExit(f"{path.name}: cells {lost} had a figure and drew none this time; nothing written")
    for i, cell in zip(indexes, part.cells):
        notebook.cells[i] = cell
    record = {"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "sections": sections or "all", "cells": [cell.id for cell in part.cells],
              "preset": os.environ.get("FEDGAN_PRESET", "(default)"), "device": device_name(),
              "seconds": round(seconds, 1)}
    notebook.metadata.setdefault("fedgan_runs", []).append(record)
    return notebook, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--sections", type=int, nargs="+", default=None, help="section numbers (default: all cells)")
    parser.add_argument("--preset", default=None, help="FEDGAN_PRESET for the kernel: smoke, cpu or full")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write the executed notebook here (a new file)")
    where.add_argument("--in-place", action="store_true", help="write it over the notebook itself")
    args = parser.parse_args()
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new file (or --in-place to write over the notebook)")
    notebook, record = execute(args.notebook, args.sections, args.preset)
    target = args.notebook if args.in_place else args.out
    target.write_text(nbformat.writes(notebook) + "\n")  # the format Jupyter writes, as the notebooks are kept
    print(json.dumps(record, indent=1))
    print(f"written to {target}")


if __name__ == "__main__":
    sys.exit(main())
