"""Objective: logits + targets -> scalar loss, plus the metrics that fit the task.

A custom loss is an `Objective` subclass that overrides `__call__` (and `metrics` if the
task differs); the loop never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .errors import ConfigError

__all__ = ["Objective", "CrossEntropy", "MeanSquaredError", "BinaryCrossEntropy"]

Metric = Callable[[np.ndarray, np.ndarray], float]


class Objective:
    """Base class: a loss for one kind of task and the metrics reported for it.

    Subclasses set `task` ("classification", "multilabel" or "regression"), `monitor` (the
    validation metric that picks the best model) with `mode` ("max" or "min"), and
    implement `__call__(logits, targets) -> loss`.

    Example:
        >>> loss = Objective.cross_entropy(label_smoothing=0.1)
        >>> float(loss(torch.zeros(2, 3), torch.tensor([0, 2]))) > 0
        True
    """

    task: str = "classification"
    monitor: str = "loss"
    mode: str = "min"

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self) -> dict[str, Metric]:
        """Metrics computed on validation outputs, by name (the loss is always added)."""
        return {}

    def check(self, outputs: int) -> None:
        """Raise ConfigError if this objective cannot train a model with `outputs` outputs.

        FineTuner asks when it is built, so that a class weight too many fails before training.
        """

    def denominator(self, targets: torch.Tensor) -> float | None:
        """What a batch's loss is an average over, where that is not its number of examples.

        The training loop weighs each batch of an accumulation window (and each data-parallel
        rank) by it, so the window's gradient is that of one batch holding all of them.
        """
        return None

    @staticmethod
    def cross_entropy(
        class_weights: Sequence[float] | torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> CrossEntropy:
        """Single-label classification: softmax cross-entropy."""
        return CrossEntropy(class_weights, label_smoothing)

    @staticmethod
    def mse() -> MeanSquaredError:
        """Regression: mean squared error."""
        return MeanSquaredError()

    @staticmethod
    def bce(pos_weight: Sequence[float] | torch.Tensor | None = None) -> BinaryCrossEntropy:
        """Multi-label classification: a sigmoid and binary cross-entropy per label."""
        return BinaryCrossEntropy(pos_weight)

    @staticmethod
    def for_task(task: str) -> Objective:
        """The default objective for a task."""
        return {
            "classification": CrossEntropy,
            "multilabel": BinaryCrossEntropy,
            "regression": MeanSquaredError,
        }[task]()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_width(weights: torch.Tensor | None, outputs: int, name: str) -> None:
    # torch's own messages ("The size of tensor a (2) must match ...") name no argument, and
    # come at the first step.
    if weights is not None and weights.numel() != outputs:
        raise ConfigError(
            f"{name} has {weights.numel()} values but the model has {outputs} outputs; give one "
            "per label, in the model's label order (model.labels)."
        )


def _optional_tensor(values: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(values, dtype=torch.float32)


class CrossEntropy(Objective):
    """`F.cross_entropy` with optional class weights and label smoothing; targets are class ids."""

    task = "classification"
    monitor = "f1"
    mode = "max"

    def __init__(
        self, class_weights: Sequence[float] | torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.class_weights = _optional_tensor(class_weights)
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        # Loss in fp32 even under autocast: log-softmax in bf16 loses the small differences.
        return F.cross_entropy(
            logits.float(), targets.long(), weight=weight, label_smoothing=self.label_smoothing
        )

    def check(self, outputs: int) -> None:
        _check_width(self.class_weights, outputs, "class_weights")

    def denominator(self, targets: torch.Tensor) -> float | None:
        # F.cross_entropy with class weights divides by the summed weights of the targets.
        if self.class_weights is None:
            return None
        return float(self.class_weights.to(targets.device)[targets.long()].sum())

    def metrics(self) -> dict[str, Metric]:
        return {"accuracy": M.accuracy, "f1": M.macro_f1, "ece": M.ece}


class MeanSquaredError(Objective):
    """`F.mse_loss`; one output per target (logits (B, 1) against targets (B,) is fine)."""

    task = "regression"
    monitor = "loss"
    mode = "min"

    def check(self, outputs: int) -> None:
        if outputs != 1:
            raise ConfigError(
                f"a model with {outputs} outputs for one regression target a row: mse() compares "
                "one output with each target; build the model with num_labels=1."
            )

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float().reshape(targets.shape), targets.float())

    def metrics(self) -> dict[str, Metric]:
        return {"mse": M.mse, "mae": M.mae}


class BinaryCrossEntropy(Objective):
    """`F.binary_cross_entropy_with_logits` on multi-hot targets, optional positive weights."""

    task = "multilabel"
    monitor = "f1"
    mode = "max"

    def __init__(self, pos_weight: Sequence[float] | torch.Tensor | None = None) -> None:
        self.pos_weight = _optional_tensor(pos_weight)

    def check(self, outputs: int) -> None:
        if self.pos_weight is None or self.pos_weight.numel() != 1:  # one value: every label's
            _check_width(self.pos_weight, outputs, "pos_weight")

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weight)

    def metrics(self) -> dict[str, Metric]:
        return {"f1": M.multilabel_f1, "subset_accuracy": M.subset_accuracy}
