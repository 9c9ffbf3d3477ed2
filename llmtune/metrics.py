"""Evaluation metrics on numpy arrays: accuracy, macro-F1, multi-label F1, MSE, MAE.

Each metric is `fn(outputs, targets) -> float`, where outputs are the model's raw logits;
that is also the signature of user metrics passed to `FineTuner(metrics=...)`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "macro_f1", "multilabel_f1", "subset_accuracy", "mse", "mae"]


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Share of examples whose arg-max class equals the target id."""
    return float((logits.argmax(-1) == targets).mean())


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    # A class absent from both predictions and targets has F1 0 here, like sklearn's default.
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)
    return float(f1.mean())


def macro_f1(logits: np.ndarray, targets: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over all classes (sklearn's `average="macro"`)."""
    k = logits.shape[-1]
    pred = logits.argmax(-1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (targets, pred), 1)
    tp = np.diag(confusion)
    return _f1_from_counts(tp, confusion.sum(0) - tp, confusion.sum(1) - tp)


def multilabel_f1(logits: np.ndarray, targets: np.ndarray) -> float:
    """Macro-F1 over labels, each predicted where its logit > 0 (sigmoid > 0.5)."""
    pred = logits > 0
    truth = targets > 0.5
    tp = (pred & truth).sum(0)
    return _f1_from_counts(tp, (pred & ~truth).sum(0), (~pred & truth).sum(0))


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
