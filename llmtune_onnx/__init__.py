"""Predict with a model that `ClassifierModel.export_onnx` wrote, with onnxruntime and tokenizers alone.

Imports neither torch, transformers nor llmtune, so a service that only predicts needs
`pip install onnxruntime tokenizers numpy` and this module:

    import llmtune_onnx
    model = llmtune_onnx.load("model-onnx")
    model.predict(["a quietly brilliant film"])   # same labels as ClassifierModel.predict
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load", "OnnxClassifier", "decide"]

MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model.int8.onnx"
META_FILE = "llmtune_onnx.json"
FORMAT = 1


def _texts(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"predict takes a list of texts, not one string; wrap it: [text] ({name})")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is {text!r} ({type(text).__name__}), not a string.")
    return texts


def decide(
    probs: np.ndarray,
    task: str,
    labels: Sequence[Any],
    thresholds: Sequence[float] | None = None,
    threshold: float | None = None,
    override: float | None = None,
) -> list[Any]:
    """Labels from probabilities: `ClassifierModel.predict`'s rule, shared with it so both decide alike.

    Multi-label: a label is on where its probability reaches `override`, else its tuned
    threshold (`thresholds`), else 0.5. Classification: a binary model picks its second label
    where its probability reaches `override`, else the tuned `threshold`; otherwise the argmax.

    Raises:
        ValueError: `override` for a model of more than two classes (no one cut decides there).
    """
    if task == "multilabel":
        cut: Any = (
            override if override is not None else np.asarray(thresholds if thresholds is not None else 0.5)
        )
        return [[labels[j] for j in np.flatnonzero(row >= cut)] for row in probs]
    if override is not None and len(labels) != 2:
        raise ValueError(
            f"threshold= decides multi-label and binary models; this one has {len(labels)} classes "
            "(its prediction is the most probable)"
        )
    cut = override if override is not None else threshold
    if cut is not None and probs.shape[1] == 2:
        return [labels[int(p >= cut)] for p in probs[:, 1]]
    return [labels[i] for i in probs.argmax(-1)]


class OnnxClassifier:
    """An exported model: tokenizer (`tokenizers`), ONNX graph (`onnxruntime`), labels and task.

    `predict`, `predict_proba` and `outputs` mirror `ClassifierModel`'s: same tokenization
    (truncated to the model's max length), same probabilities within float rounding.

    Args:
        directory: what `export_onnx` wrote.
        quantized: run `model.int8.onnx` (written by `llmtune.onnx.quantize`).
        threads: onnxruntime's intra-op threads (None: its default, all cores).
        providers: onnxruntime execution providers (default: the CPU).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        quantized: bool = False,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        directory = Path(directory)
        meta_file = directory / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{directory} holds no ONNX export ({META_FILE} is missing)")
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as err:
            raise ValueError(f"{meta_file} is damaged ({err}); export the model again") from None
        graph = directory / (QUANTIZED_FILE if quantized else MODEL_FILE)
        for path in (directory / "tokenizer.json", graph):
            if not path.is_file():
                remedy = (
                    "llmtune.onnx.quantize(directory) writes it"
                    if path.name == QUANTIZED_FILE
                    else "export again"
                )
                raise FileNotFoundError(
                    f"{directory} is an incomplete ONNX export: {path.name} is missing; {remedy}"
                )
        if meta.get("format", 0) > FORMAT:
            raise ValueError(f"{meta_file}: written by a newer llmtune (format {meta['format']}); upgrade it")
        self.task: str = meta["task"]
        self.labels: list[str] | None = meta["labels"]
        self.inputs: list[str] = meta["inputs"]
        self.output: str = meta["output"]
        self.pad_id, self.pad_left = int(meta["pad_id"]), bool(meta["pad_left"])
        self.empty_id = int(meta.get("empty_id", self.pad_id))  # exports before it had none
        # Decision thresholds that ClassifierModel.calibrate tuned (exports before them have none).
        self.thresholds: list[float] | None = meta.get("thresholds")
        self.threshold: float | None = meta.get("threshold")
        try:
            self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(
                f"{directory / 'tokenizer.json'} is damaged ({err}); export the model again"
            ) from None
        # Which end a long text loses, as the model's tokenizer chose (exports before: the right).
        self.tokenizer.enable_truncation(
            int(meta["max_length"]), direction=meta.get("truncation_side", "right")
        )
        self.tokenizer.no_padding()  # padded per batch below
        # Special tokens' text in a text is read as text where the tokenizer said so (before: not).
        self.tokenizer.encode_special_tokens = bool(meta.get("split_special_tokens", False))
        self.max_length, self.truncate_left = int(meta["max_length"]), meta.get("truncation_side") == "left"
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            str(graph), options, providers=list(providers or ["CPUExecutionProvider"])
        )

    def outputs(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """The graph's outputs for each text, shape (N, num_labels): probabilities, or values (regression).

        Texts go through in length order, so each batch pads little; rows come back in input order.
        """
        texts = _texts(texts, "texts")
        pairs = None if text_pairs is None else _texts(text_pairs, "text_pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} text_pairs.")
        width = self.session.get_outputs()[0].shape[-1]
        out = np.zeros((len(texts), width if isinstance(width, int) else 1), dtype=np.float32)
        if not texts:
            return out
        if pairs is not None:
            texts, pairs = self._clip_pairs(texts, pairs)
        encodings = self.tokenizer.encode_batch(texts if pairs is None else list(zip(texts, pairs)))
        # An empty text with no special tokens around it reads as one token, as in llmtune.
        ids = [e.ids or [self.empty_id] for e in encodings]
        type_ids = [e.type_ids or [0] for e in encodings]
        lengths = np.array([len(i) for i in ids])
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = int(lengths[rows].max())
            feed = {name: np.zeros((len(rows), longest), dtype=np.int64) for name in self.inputs}
            feed["input_ids"].fill(self.pad_id)
            for row, i in enumerate(rows):
                n = int(lengths[i])
                cols = slice(longest - n, longest) if self.pad_left else slice(0, n)
                feed["input_ids"][row, cols] = ids[i]
                feed["attention_mask"][row, cols] = 1
                if "token_type_ids" in feed:
                    feed["token_type_ids"][row, cols] = type_ids[i]
            out[rows] = self.session.run([self.output], feed)[0]
        return out

    @functools.cached_property
    def _untruncated(self) -> Any:
        """The tokenizer without truncation, for `_clip_pairs`: a copy made when a pair first comes."""
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.no_truncation()
        plain.encode_special_tokens = self.tokenizer.encode_special_tokens
        return plain

    def _clip_pairs(
        self, first: list[str], second: list[str], margin: int = 16
    ) -> tuple[list[str], list[str]]:
        """Cut both texts of long pairs a little beyond what truncation keeps, as llmtune does
        (`_tokens.clip_pairs`): tokenizers truncates a pair of long texts in time and memory that
        grow with the square of their length. The longer side is cut a margin later, so truncation
        ("longest_first") keeps the same tokens; from the start where truncation cuts on the left."""
        long = [i for i, (a, b) in enumerate(zip(first, second)) if min(len(a), len(b)) > self.max_length]
        if not long:
            return first, second
        first, second = list(first), list(second)
        encodings = self._untruncated.encode_batch(
            [first[i] for i in long] + [second[i] for i in long], add_special_tokens=False
        )
        for j, i in enumerate(long):
            a, b = encodings[j].offsets, encodings[len(long) + j].offsets
            for side, mine, other in ((first, a, b), (second, b, a)):
                keep = self.max_length + margin * (2 if len(mine) > len(other) else 1)
                if len(mine) > keep:  # exactly `keep` tokens on the side truncation keeps
                    side[i] = side[i][mine[-keep][0] :] if self.truncate_left else side[i][: mine[keep][0]]
        return first, second

    def predict_proba(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """Class probabilities (softmax; sigmoid per label for multi-label), shape (N, num_labels)."""
        if self.task == "regression":
            raise ValueError("predict_proba has no meaning for regression; use predict")
        return self.outputs(texts, text_pairs, batch_size)

    def predict(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        threshold: float | None = None,
    ) -> list[Any]:
        """Label names (classification), lists of names (multi-label) or floats (regression), one per text.

        Decisions follow `ClassifierModel.predict`: multi-label turns a label on where its
        probability reaches `threshold`, else the calibrated per-label threshold, else 0.5; a
        binary classifier picks its second label where its probability reaches `threshold`,
        else the calibrated threshold.
        """
        if self.task == "regression" and threshold is not None:
            raise ValueError("threshold= decides labels; a regression model has none")
        out = self.outputs(texts, text_pairs, batch_size)
        if self.task == "regression":
            return out[:, 0].tolist() if out.shape[1] == 1 else out.tolist()
        assert self.labels is not None
        return decide(out, self.task, self.labels, self.thresholds, self.threshold, threshold)


def load(directory: str | os.PathLike, **options: Any) -> OnnxClassifier:
    """The exported model in `directory` (options: `quantized`, `threads`, `providers`)."""
    return OnnxClassifier(directory, **options)
