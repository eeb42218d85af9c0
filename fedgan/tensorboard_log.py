"""A federation's rounds as TensorBoard scalars and images, written as they happen, so a grid can be watched live."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from fedgan.config import FedConfig

Tensor = torch.Tensor

SCALARS = {  # tag: the history record's key
    "loss/discriminator": "d_loss", "loss/generator": "g_loss", "time/round_seconds": "seconds",
    "time/images_per_s": "images_per_s", "data/images_total": "images_total", "comm/bytes_up": "bytes_up",
    "comm/bytes_down": "bytes_down", "comm/bytes_total": "bytes_total", "privacy/epsilon": "epsilon",
}
METRICS = ("fid", "kid", "is", "cond_acc")


def board_folder(config: FedConfig, run_name: str) -> Path | None:
    """Where a run's event files go: <out_dir>/tensorboard/<run> for tensorboard=True, <folder>/<run> for a folder
    (one folder a run, so `tensorboard --logdir` shows a grid's cells side by side), None when off."""
    if config.tensorboard is False:
        return None
    root = Path(config.out_dir) / "tensorboard" if config.tensorboard is True else Path(config.tensorboard)
    return root / run_name


class RoundBoard:
    """Writes each round's losses, time, images, bytes, epsilon and metrics as scalars, and the fixed-noise grid."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(f"tensorboard={str(folder)!r} needs the tensorboard package ({error}); "
                              "pip install tensorboard, or set tensorboard=False") from error
        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: Mapping[str, Any], grid: Tensor) -> None:
        """`record`: a history record; `grid`: [100, C, H, W] in [-1, 1], ten rows of ten labels."""
        from torchvision.utils import make_grid

        step = record["round"]
        for tag, key in SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        for key in METRICS:
            value = (record.get("metrics") or {}).get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"metrics/{key}", value, step)
        picture = make_grid(grid.float().cpu(), nrow=10, normalize=True, value_range=(-1, 1), pad_value=1)
        self.writer.add_image("samples/fixed_noise", picture, step)  # (C, H', W') in [0, 1]
        self.writer.flush()


def open_board(config: FedConfig, run_name: str) -> RoundBoard | None:
    """The RoundBoard of a run of `config`, or None when config.tensorboard is off."""
    folder = board_folder(config, run_name)
    return RoundBoard(folder) if folder is not None else None
