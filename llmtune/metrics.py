"""Evaluation metrics on numpy arrays: accuracy, macro-F1, multi-label F1, MSE, MAE.

Each metric is `fn(outputs, targets) -> float`, where outputs are the model's raw logits;
that is also the signature of user metrics passed to `FineTuner(metrics=...)`.
"""

from __future__ import annotations

import numpy as np

from . import _calibration

__all__ = [
    "accuracy",
    "macro_f1",
    "multilabel_f1",
    "subset_accuracy",
    "mse",
    "mae",
    "ece",
    "f1_per_class",
    "lower_is_better",
]

LOWER_IS_BETTER = frozenset({"mse", "mae", "ece"})


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of metric `name` is better (a loss, an error): `mode="auto"`'s rule."""
    return "loss" in name or name.removeprefix("val_") in LOWER_IS_BETTER


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Share of examples whose arg-max class equals the target id."""
    return float((logits.argmax(-1) == targets).mean())


def f1_per_class(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn) per class, from its counts; 0 where it has no targets or predictions."""
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)


def macro_f1(logits: np.ndarray, targets: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in the targets or the
    predictions, as scikit-learn's ``f1_score(average="macro")`` does.

    A class the model may output but that neither the targets nor the predictions hold has
    no F1 at all; counting it as 0 would understate the score (3 of 4 possible classes
    predicted perfectly would give 0.75 instead of 1.0).
    """
    k = logits.shape[-1]
    pred = logits.argmax(-1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (targets, pred), 1)
    tp = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    present = (predicted + actual) > 0
    return float(f1_per_class(tp, predicted - tp, actual - tp)[present].mean())


def multilabel_f1(logits: np.ndarray, targets: np.ndarray) -> float:
    """Macro-F1 over every label, each predicted where its logit > 0 (sigmoid > 0.5).

    As scikit-learn's ``f1_score(average="macro")`` on indicator arrays: every label column
    counts, and one with neither targets nor predictions scores 0.
    """
    pred = logits > 0
    truth = targets > 0.5
    tp = (pred & truth).sum(0)
    return float(f1_per_class(tp, (pred & ~truth).sum(0), (~pred & truth).sum(0)).mean())


def ece(logits: np.ndarray, targets: np.ndarray) -> float:
    """Expected calibration error (15 equal-width confidence bins) of softmax or sigmoid outputs."""
    return _calibration.ece(logits, targets)


def subset_accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Share of examples whose whole predicted label set is exactly right."""
    return float(((logits > 0) == (targets > 0.5)).all(-1).mean())


def _as_targets(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return logits.reshape(targets.shape) if logits.size == targets.size else logits


def mse(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error of the outputs against float targets."""
    return float(((_as_targets(logits, targets) - targets) ** 2).mean())


def mae(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean absolute error of the outputs against float targets."""
    return float(np.abs(_as_targets(logits, targets) - targets).mean())
