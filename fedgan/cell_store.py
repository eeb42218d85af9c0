"""A grid's finished cells kept on disk, so that a grid stopped part-way (a kernel restarted, a GPU's lease ended)
is run again and trains only the cells it had not finished.

A cell is found by everything that decides its result: its config (less its names and folders), a server rule
passed as an object (its class's source and attributes), the data, the metric classifier's weights and the
evaluator's settings, the device, torch's version and this package's source. A change to any of them makes another
cell, so nothing is reused that the same code on the same device would not compute again. What is kept is what a
grid's tables and figures use: the cell's row, its history, its final metrics and its sample grid (the generator
on the fixed noise, to 8 bits, as a figure shows it); not its weights, which at the full preset would take a few
MB a cell.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from fedgan.checkpoints import load_checkpoint, pack_grid, save_checkpoint, unpack_grid
from fedgan.config import FedConfig
from fedgan.data import training_images
from fedgan.digests import digest, tensor_digest
from fedgan.environment import pick_device
from fedgan.metrics import Evaluator
from fedgan.strategies import Strategy

Tensor = torch.Tensor

# fields that name or place a run's files and do not change what it computes
NOT_IN_KEY = ("run_name", "out_dir", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "tensorboard",
              "data_root")
PACKAGE = Path(__file__).resolve().parent


def cell_slug(name: str) -> str:
    """A cell's name as a file name's part: "FedAvg / dir0.1" -> "FedAvg---dir0-1"."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def source_digest() -> str:
    """A digest of every Python file of the package: another version of the code is another cell."""
    files = sorted(PACKAGE.rglob("*.py"))
    return digest(*(part for path in files for part in (str(path.relative_to(PACKAGE)).encode(), path.read_bytes())))


def scorer_digest(evaluator: Evaluator) -> str:
    """The metric classifier's weights and the evaluator's settings: its real features follow from them, and a
    digest of the features themselves would move with a GPU's float reductions from one machine to the next."""
    settings = f"{evaluator.n} {evaluator.seed} {evaluator.kid_subsets}".encode()
    return digest(settings, tensor_digest(evaluator.real_labels, *evaluator.classifier.state_dict().values()).encode())


def rule_description(rule: Strategy | None) -> str:
    """A server rule passed as an object: its class's source (where Python can find it) and its attributes."""
    if rule is None:
        return ""
    try:
        source = inspect.getsource(type(rule))
    except (OSError, TypeError):  # a class Python holds no source for: its name stands for it
        source = type(rule).__qualname__
    return source + repr(sorted((k, repr(v)) for k, v in vars(rule).items()))


@dataclasses.dataclass
class FinishedRun:
    """A cell read back from a CellStore: what a grid's tables and figures use of its Federation."""
    config: FedConfig
    history: list[dict[str, Any]]
    strategy_name: str
    metrics: dict[str, Any]
    samples: Tensor  # [100, C, H, W] in [-1, 1], the sample grid to 8 bits (checkpoints.pack_grid)
    evaluator: Evaluator
    images: Tensor = dataclasses.field(repr=False)  # the images and labels the run trained on (train_subset)
    labels: Tensor = dataclasses.field(repr=False)

    def sample_grid(self) -> Tensor:
        """The final global generator on the fixed noise and labels, as the cell's Federation drew it."""
        return self.samples

    def evaluate(self) -> dict[str, Any]:
        """The final generator's metrics, as the cell's run scored them."""
        return self.metrics

    def __getattr__(self, name: str) -> Any:
        if name in ("generator", "discriminator"):
            raise AttributeError(f"{name}: a cell read from a CellStore keeps no weights, only its row, history, "
                                 "metrics and sample grid; run the cell without the store for its models")
        raise AttributeError(name)


class CellStore:
    """Finished cells of grids in a folder, a file a cell: <key>-<cell name>.pt, written atomically."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._source = source_digest()

    def key(self, config: FedConfig, rule: Strategy | None, data: tuple[Tensor, Tensor], evaluator: Evaluator,
            extra: str = "") -> str:
        """What decides a cell's result, as a digest; `extra`: anything else that does (a baseline's targets)."""
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_KEY}
        device = pick_device(config.device)
        hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return digest(json.dumps(fields, sort_keys=True, default=repr).encode(), rule_description(rule).encode(),
                       tensor_digest(*data).encode(), scorer_digest(evaluator).encode(),
                       f"{hardware} | torch {torch.__version__}".encode(), self._source.encode(), extra.encode())

    def find(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The file and contents of the cell of this key, whatever the name it was run under."""
        for path in sorted(self.folder.glob(f"{key[:16]}-*.pt")):
            saved = load_checkpoint(path)
            if saved["key"] == key:  # not merely the first 16 digits of the same key
                return path, saved
        return None

    def load(self, key: str, *, config: FedConfig, evaluator: Evaluator, data: tuple[Tensor, Tensor]
             ) -> tuple[dict[str, Any], FinishedRun] | None:
        """The cell's results (its row less the cell's overrides) and FinishedRun, or None when it is not kept.
        `config` is the asking cell's (of this key: at most its names and folders differ from the stored one's)."""
        found = self.find(key)
        if found is None:
            return None
        _, saved = found
        row = json.loads(saved["row"])
        images, labels = training_images(config, *data)  # as the Federation held them
        run = FinishedRun(config=config, history=json.loads(saved["history"]),
                          strategy_name=row["strategy"], metrics=json.loads(saved["metrics"]),
                          samples=unpack_grid(saved["samples"]), evaluator=evaluator, images=images, labels=labels)
        return row, run

    def save(self, name: str, key: str, row: dict[str, Any], run: Any, metrics: dict[str, Any]) -> Path:
        """Keep a finished cell's results (its row less its overrides) and its run (a Federation); a cell already
        kept is left as it is."""
        return self._write(name, key, {"row": json.dumps(row, default=repr), "history": json.dumps(run.history),
                                       "metrics": json.dumps(metrics), "config": run.config.to_json(),
                                       "samples": pack_grid(run.sample_grid())})

    def load_rows(self, key: str) -> list[dict[str, Any]] | None:
        """Table rows kept by save_rows under this key, or None."""
        found = self.find(key)
        return None if found is None else json.loads(found[1]["rows"])

    def save_rows(self, name: str, key: str, rows: list[dict[str, Any]], config: FedConfig) -> Path:
        """Keep table rows that are not one federation's cell (the centralized baseline's), trained by `config`."""
        return self._write(name, key, {"rows": json.dumps(rows, default=repr), "config": config.to_json()})

    def cells(self) -> list[dict[str, Any]]:
        """A line for every kept cell, oldest first: its name, seed and results (a baseline's: a line a row).
        What a stopped grid has finished so far, e.g. after a GPU session."""
        lines = []
        for path in sorted(self.folder.glob("*.pt"), key=lambda p: p.stat().st_mtime):
            saved = load_checkpoint(path)
            seed = json.loads(saved["config"])["seed"]
            if "rows" in saved:
                lines += [{**row, "cell": f"{row['model']} | {saved['cell']}", "seed": seed}
                          for row in json.loads(saved["rows"])]
            else:
                lines.append({**json.loads(saved["row"]), "cell": saved["cell"], "seed": seed})
        return lines

    def _write(self, name: str, key: str, payload: dict[str, Any]) -> Path:
        found = self.find(key)
        if found is not None:  # kept already: left as it is
            return found[0]
        return save_checkpoint(self.folder / f"{key[:16]}-{cell_slug(name)}.pt", {"key": key, "cell": name, **payload})
