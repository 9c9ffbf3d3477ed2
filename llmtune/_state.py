"""The run state of a FineTuner: `TrainState` (what callbacks read) and its `History`."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["History", "TrainState", "plan_steps"]

logger = logging.getLogger("llmtune")

DEFAULT_EPOCHS = 3


def plan_steps(
    steps_per_epoch: int, epochs: int | None, max_steps: int | None, min_steps: int
) -> tuple[int, bool]:
    """(total optimizer steps, whether `min_steps` lengthened a default-length run).

    `max_steps` wins; else `epochs` passes; else 3 passes or `min_steps`, whichever is more.
    """
    total = max_steps if max_steps is not None else (epochs or DEFAULT_EPOCHS) * steps_per_epoch
    if max_steps is not None or epochs is not None or total >= min_steps:
        return total, False
    raised = math.ceil(min_steps / steps_per_epoch)
    logger.info(
        "%d epochs of %d steps are fewer than min_steps=%d: training %d epochs (epochs= sets them)",
        DEFAULT_EPOCHS,
        steps_per_epoch,
        min_steps,
        raised,
    )
    return raised * steps_per_epoch, True


@dataclass
class History:
    """One record per epoch: epoch, step, train_loss and val_* metrics."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, key: str) -> list[Any]:
        """All epochs' values of one key, e.g. `history["val_accuracy"]`."""
        return [r.get(key) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def train_loss(self) -> list[float]:
        return self["train_loss"]

    def to_jsonl(self, path: str) -> None:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)


@dataclass
class TrainState:
    """Everything about a run in progress that callbacks may read (and `should_stop` write).

    The `epoch_*` and `batches_done` fields are the position inside the current epoch; with
    the optimizer, scheduler and scaler they are what a checkpoint needs to resume exactly.
    """

    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    batches_per_epoch: int = 0  # micro-batches
    batches_done: int = 0  # micro-batches of this epoch consumed so far
    examples_seen: int = 0
    epoch_loss: torch.Tensor | float = 0.0  # sum of loss * examples this epoch, on the device
    epoch_examples: int = 0
    epoch_skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: History = field(default_factory=History)
    should_stop: bool = False
    optimizer: Any = field(default=None, repr=False)
    scheduler: Any = field(default=None, repr=False)
    scaler: Any = field(default=None, repr=False)

    def next_epoch(self) -> None:
        """Reset the per-epoch position and sums."""
        self.batches_done, self.epoch_examples, self.epoch_skipped = 0, 0, 0
        self.epoch_loss = torch.zeros_like(torch.as_tensor(self.epoch_loss))
