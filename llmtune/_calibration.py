"""Calibration on held-out data: temperature scaling, calibration error, decision thresholds.

Pure functions on numpy outputs; `ClassifierModel.calibrate` runs the model and keeps what
they fit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


def probabilities(logits: np.ndarray, task: str, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) for classification, sigmoid(logits / T) per label for multi-label."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature
    return (scaled.sigmoid() if task == "multilabel" else scaled.softmax(-1)).numpy()


def nll(logits: np.ndarray, targets: np.ndarray, task: str, temperature: float = 1.0) -> float:
    """Negative log-likelihood of the targets under the tempered probabilities."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature
    if task == "multilabel":
        return float(F.binary_cross_entropy_with_logits(scaled, torch.from_numpy(targets).float()))
    return float(F.cross_entropy(scaled, torch.from_numpy(targets).long()))


def fit_temperature(logits: np.ndarray, targets: np.ndarray, task: str) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (Guo et al., 2017).

    One scalar, by L-BFGS on log T (so T stays positive), from T = 1. It rescales
    confidence without changing any argmax.
    """
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(targets)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = z / log_t.exp()
        if task == "multilabel":
            value = F.binary_cross_entropy_with_logits(scaled, y.double())
        else:
            value = F.cross_entropy(scaled, y.long())
        value.backward()
        return value

    optimizer.step(loss)
    return float(log_t.detach().exp())


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over `bins` equal-width confidence bins.

    Classification (targets are class ids): the confidence is the top probability and the
    event that its class is right. Multi-label (multi-hot targets): every (example, label)
    probability is one prediction of that label being on.
    """
    if targets.ndim == 2:
        confidence, correct = probs.ravel(), (targets > 0.5).ravel()
    else:
        confidence, correct = probs.max(-1), probs.argmax(-1) == targets
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # bin of each prediction
    gap = 0.0
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            gap += chosen.sum() * abs(correct[chosen].mean() - confidence[chosen].mean())
    return float(gap / max(len(confidence), 1))


def ece(logits: np.ndarray, targets: np.ndarray) -> float:
    """`expected_calibration_error` of a model's outputs: the metric `evaluate` reports as "ece"."""
    task = "multilabel" if np.asarray(targets).ndim == 2 else "classification"
    return expected_calibration_error(probabilities(logits, task), np.asarray(targets))


def _f1_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, precision, recall, F1) of the rule `score >= threshold`, at every distinct score."""
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order].astype(float)
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    tp = np.cumsum(truth)[last]
    predicted = last + 1
    precision = tp / predicted
    recall = tp / max(truth.sum(), 1.0)
    f1 = np.divide(2 * tp, predicted + truth.sum(), out=np.zeros_like(tp), where=predicted + truth.sum() > 0)
    return scores[last], precision, recall, f1


def best_f1_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold on `scores` whose rule `score >= t` has the highest F1 (0.5 without positives).

    Of equally good thresholds, the one midway between that score and the next lower one,
    so that a slightly different score on new data falls on the same side.
    """
    if not truth.any():
        return 0.5
    thresholds, _, _, f1 = _f1_curve(scores, truth)
    i = int(np.argmax(f1))
    below = thresholds[i + 1] if i + 1 < len(thresholds) else 0.0
    # As a float32, what predict compares float32 probabilities with; two adjacent float32
    # scores have no float32 between them, and then the cut is the upper score itself.
    middle = np.float32((np.float64(thresholds[i]) + np.float64(below)) / 2)
    return float(middle if middle > np.float32(below) else np.float32(thresholds[i]))


def target_threshold(scores: np.ndarray, truth: np.ndarray, metric: str, target: float) -> float:
    """The threshold meeting `metric >= target` ("precision" or "recall") that is best at the other.

    Precision: the lowest threshold that reaches it (the most recall); recall: the one with
    the most precision (the highest of equals: precision does not rise with the threshold
    everywhere). Raises ValueError when no threshold reaches the target.
    """
    thresholds, precision, recall, _ = _f1_curve(scores, truth)
    if metric == "precision":
        ok = np.flatnonzero(precision >= target)
        if not len(ok):
            raise ValueError(
                f"no threshold reaches precision {target} on this data (best {precision.max():.3f})"
            )
        return float(thresholds[ok[-1]])
    ok = np.flatnonzero(recall >= target)
    if not truth.any() or not len(ok):  # without positives recall is 0 at every threshold
        raise ValueError(f"no threshold reaches recall {target} on this data: it holds no positives")
    return float(thresholds[ok[np.argmax(precision[ok])]])
