"""What `ClassifierModel` does with texts once trained: outputs, probabilities, labels, calibration.

A base class of `ClassifierModel`, apart from its structure and files. Texts become rows
through `_tokens.encode` (windows with a stride), rows go through the model in length
order, and a text's windows are aggregated into its one output; calibration keeps a
temperature and decision thresholds that `predict_proba` and `predict` apply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

# The decision rule lives in the torch-free ONNX loader, so an export decides as the model does.
from llmtune_onnx import decide

from . import _calibration, _runtime
from ._batching import Tokenized
from ._tokens import aggregate, encode, padding
from .errors import ConfigError, DataError
from .metrics import f1_per_class

if TYPE_CHECKING:
    from .data import DatasetAdapter

logger = logging.getLogger("llmtune")

THRESHOLD_RULES = ("f1", "precision", "recall")


def _text_list(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"predict takes a list of texts, not one string; wrap it: [text] ({name})")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{name}[{i}] is {text!r} ({type(text).__name__}), not a string.")
    return texts


class Inference:
    """Outputs, probabilities, labels and calibration for a `ClassifierModel`.

    Attributes it keeps (saved with the model): `temperature` (1.0 until `calibrate`),
    `thresholds` (per-label decision thresholds of a multi-label model, or None for 0.5)
    and `threshold` (the positive class's, for a binary classifier, or None for argmax).
    """

    temperature: float = 1.0
    thresholds: list[float] | None = None
    threshold: float | None = None

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def tokenize(self, data: DatasetAdapter) -> Tokenized:
        """`data`'s rows as this model reads them: its tokenizer, `max_length` and `stride`."""
        return data.tokenize(self.tokenizer, self.max_length, self.stride)

    @torch.inference_mode()
    def outputs(self, data: Tokenized, batch_size: int = 64, indices: np.ndarray | None = None) -> np.ndarray:
        """Raw outputs for tokenized rows (all, or those at `indices`), in that order, in eval mode.

        Batches go in length order so each pads little; the outputs are put back in place.
        Returns shape (rows, num_labels): with windows, `aggregate` makes them per text.
        """
        chosen = np.arange(len(data)) if indices is None else np.asarray(indices)
        out = np.empty((len(chosen), self.head.out_features), dtype=np.float32)
        order = np.argsort(data.lengths[chosen], kind="stable")
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = data.collate(chosen[rows], _runtime.pad_multiple(self.device))
                batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
                out[rows] = self(**batch).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def aggregate(self, rows: np.ndarray, data: Tokenized) -> np.ndarray:
        """One output per text from its rows' outputs (windows: the model's `aggregation`)."""
        return aggregate(rows, data.text, self.aggregation)

    def logits(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        precision: str = "auto",
    ) -> np.ndarray:
        """Raw outputs for a list of texts, shape (N, num_labels).

        `precision`: "auto" runs bf16 autocast where the hardware computes bf16 natively (CUDA
        GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX: ~2-4x faster, outputs within
        ~1e-2), else fp32, never fp16 (which has no overflow guard outside training); "fp32"
        gives exact outputs.
        """
        texts = _text_list(texts, "texts")
        pairs = None if text_pairs is None else _text_list(text_pairs, "text_pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise DataError(f"{len(texts)} texts but {len(pairs)} text_pairs.")
        if not texts:
            return np.zeros((0, self.head.out_features), dtype=np.float32)
        pad = padding(self.tokenizer)
        rows = encode(self.tokenizer, texts, pairs, self.max_length, self.stride)
        data = Tokenized.from_rows(
            rows["input_ids"], rows.get("token_type_ids"), None, **pad, text=rows["text"]
        )
        with _runtime.autocast(self.device, _runtime.inference_precision(precision, self.device)):
            return self.aggregate(self.outputs(data, batch_size), data)

    def predict_proba(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        precision: str = "auto",
    ) -> np.ndarray:
        """Class probabilities (softmax; sigmoid per label for multi-label), shape (N, num_labels),
        at the temperature `calibrate` fitted (1.0 before)."""
        if self.task == "regression":
            raise ConfigError("predict_proba has no meaning for regression; use predict")
        logits = self.logits(texts, text_pairs, batch_size, precision)
        return _calibration.probabilities(logits, self.task, self.temperature)

    def predict(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        threshold: float | None = None,
        precision: str = "auto",
    ) -> list[Any]:
        """Label names (classification), lists of names (multi-label) or floats (regression), one per text.

        Multi-label: a label is on where its probability reaches `threshold`, else its tuned
        threshold (`calibrate`), else 0.5. Binary classification: the second label where its
        probability reaches `threshold`, else the tuned one (`calibrate(threshold=...)`), else
        the argmax. More classes: the argmax (a `threshold` is refused).

        Raises:
            ConfigError: `threshold` for a regression model or one of more than two classes.
        """
        many = self.task == "classification" and len(self.labels or ()) > 2
        if threshold is not None and (self.task == "regression" or many):
            what = "a regression model" if self.task == "regression" else f"{len(self.labels)} classes"
            raise ConfigError(f"threshold= decides multi-label and binary models, not {what}")
        if self.task == "regression":
            out = self.logits(texts, text_pairs, batch_size, precision)
            return out[:, 0].tolist() if out.shape[1] == 1 else out.tolist()
        probs = self.predict_proba(texts, text_pairs, batch_size, precision)
        return self.decide(probs, threshold)

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> list[Any]:
        """Labels from probabilities by the model's decision rule (see `predict`)."""
        return decide(probs, self.task, self.labels, self.thresholds, self.threshold, threshold)

    def calibrate(
        self,
        data: DatasetAdapter,
        *,
        threshold: str | None = None,
        target: float | None = None,
        batch_size: int = 64,
        precision: str = "auto",
    ) -> dict[str, Any]:
        """Fit temperature scaling (and decision thresholds) on held-out `data`; kept and saved.

        The temperature T minimises the negative log-likelihood of softmax(logits / T) (one
        scalar, by L-BFGS); `predict_proba` applies it. A multi-label model also gets one
        threshold per label, the one with the best F1 on `data`. A binary classifier gets a
        threshold for its second label when asked: `threshold="f1"` (best F1),
        `threshold="precision", target=0.9` (the most recall at precision >= 0.9) or
        `threshold="recall", target=0.8` (the most precision at recall >= 0.8).
        Use data the model was not trained on: the validation split. `precision` as in
        `predict`, whose outputs the calibration is for.

        Returns:
            What was fitted and what it changed on `data`: temperature, thresholds, and NLL,
            ECE (15 bins) and F1 before and after.

        Raises:
            ConfigError: a regression model, a threshold rule for a model that is not a
                binary classifier, an unknown rule, or a target no threshold reaches.

        Example:
            >>> model.calibrate(validation)  # doctest: +SKIP
            {'temperature': 1.83, 'nll_before': 0.61, 'nll_after': 0.48, 'ece_before': 0.11, ...}
        """
        if self.task == "regression":
            raise ConfigError("calibrate is for classifiers; a regression model has no probabilities")
        if threshold is not None and (self.task != "classification" or len(self.labels) != 2):
            raise ConfigError(
                f"threshold={threshold!r} is for binary classifiers; this one has labels {self.labels}"
            )
        if threshold is not None and threshold not in THRESHOLD_RULES:
            raise ConfigError(f"threshold must be one of {THRESHOLD_RULES} or None, got {threshold!r}")
        if (threshold in ("precision", "recall")) != (target is not None):
            raise ConfigError(
                f"threshold={threshold!r} with target={target!r}: a target (e.g. 0.9) goes with "
                "threshold='precision' or 'recall', and only with them."
            )
        data.check_compatible(self.labels, self.task, "calibration")
        tokens = self.tokenize(data)
        with _runtime.autocast(self.device, _runtime.inference_precision(precision, self.device)):
            logits = self.aggregate(self.outputs(tokens, batch_size), tokens)
        targets = tokens.text_labels
        temperature = _calibration.fit_temperature(logits, targets, self.task)
        report: dict[str, Any] = {"temperature": temperature}
        for when, t in (("before", 1.0), ("after", temperature)):
            probs = _calibration.probabilities(logits, self.task, t)
            report[f"nll_{when}"] = _calibration.nll(logits, targets, self.task, t)
            report[f"ece_{when}"] = _calibration.expected_calibration_error(probs, targets)
        probs = _calibration.probabilities(logits, self.task, temperature)
        self.temperature, self.thresholds, self.threshold = temperature, None, None
        if self.task == "multilabel":
            truth = targets > 0.5
            report["f1_before"] = _f1(probs >= 0.5, truth)
            cuts = [_calibration.best_f1_threshold(probs[:, j], truth[:, j]) for j in range(probs.shape[1])]
            self.thresholds = report["thresholds"] = cuts
            report["f1_after"] = _f1(probs >= np.asarray(cuts), truth)
        elif threshold is not None:
            positive, truth = probs[:, 1], targets == 1
            report["f1_before"] = _f1(probs.argmax(-1)[:, None] == 1, truth[:, None])
            try:
                if threshold == "f1":
                    cut = _calibration.best_f1_threshold(positive, truth)
                else:
                    cut = _calibration.target_threshold(positive, truth, threshold, float(target))
            except ValueError as err:
                raise ConfigError(f"calibrate(threshold={threshold!r}, target={target}): {err}.") from None
            self.threshold = report["threshold"] = cut
            report["f1_after"] = _f1((positive >= cut)[:, None], truth[:, None])
        return report

    def reset_calibration(self) -> None:
        """Forget temperature and thresholds: they describe the weights they were fitted on.

        `FineTuner.fit` calls it, as training changes the weights.
        """
        if (self.temperature, self.thresholds, self.threshold) != (1.0, None, None):
            logger.info("calibration reset: it was fitted to other weights; calibrate again")
        self.temperature, self.thresholds, self.threshold = 1.0, None, None


def _f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Macro-F1 over the columns of boolean (N, K) predictions."""
    tp = (predicted & truth).sum(0)
    return float(f1_per_class(tp, (predicted & ~truth).sum(0), (~predicted & truth).sum(0)).mean())
