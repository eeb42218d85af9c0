"""The watchdog: a run that stopped learning ends with a clear message instead of training on NaN."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.nn as nn

from fedgan.config import FedConfig


class DivergenceError(RuntimeError):
    """A run that stopped learning: the global model went NaN/Inf or the discriminator loss collapsed."""


def check_divergence(record: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                     models: Mapping[str, nn.Module], config: FedConfig, last_checkpoint: Path | None) -> None:
    """Raise DivergenceError when a global model (`models`: name -> module) has NaN/Inf, or D's loss stayed under
    config.collapse_loss for config.watchdog_rounds rounds up to `record`; the message says where to resume."""
    def advice() -> str:
        return (f"The last checkpoint is {last_checkpoint} (resume=True continues from it); try lower learning rates, "
                "a robust strategy or update_threshold." if last_checkpoint else "No checkpoint was saved yet.")
    for name, model in models.items():
        broken = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not v.isfinite().all()]
        if broken:
            raise DivergenceError(f"round {record['round']}: the global {name} has NaN/Inf in {broken[:3]}. "
                                  + advice())
    rounds = config.watchdog_rounds
    recent = [r["d_loss"] for r in [*history, record][-rounds:]] if rounds else []
    if rounds and len(recent) == rounds and all(loss < config.collapse_loss for loss in recent):
        raise DivergenceError(f"round {record['round']}: the discriminator loss stayed below "
                              f"collapse_loss={config.collapse_loss} for {rounds} rounds ({recent}); "
                              "the generator no longer learns. " + advice())
