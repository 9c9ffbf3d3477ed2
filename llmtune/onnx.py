"""ONNX export: a ClassifierModel as one ONNX graph of its probabilities, with tokenizer and labels beside it.

`export` (also `ClassifierModel.export_onnx`) writes the directory; `quantize` adds a dynamic
int8 copy; `load` (from `llmtune_onnx`, which imports neither torch nor transformers) predicts
from it with onnxruntime and tokenizers. Install with `pip install llmtune[export]`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

# The loader lives in llmtune_onnx, so that inference needs neither torch nor llmtune.
from llmtune_onnx import META_FILE, MODEL_FILE, QUANTIZED_FILE, OnnxClassifier, load

from . import _atomic
from ._tokens import empty_id
from .errors import ConfigError

__all__ = ["export", "quantize", "load", "OnnxClassifier"]

EXPORT_MISSING = "{what} needs the {package} package, an optional extra: pip install llmtune[export]"
FORMAT = 1
_OUTPUTS = {"classification": "probabilities", "multilabel": "probabilities", "regression": "values"}


def _require(*packages: str, what: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise ImportError(EXPORT_MISSING.format(what=what, package=package))


class Probabilities(nn.Module):
    """What `predict_proba` computes, as one module: softmax (sigmoid for multi-label) of the
    logits at the model's calibrated temperature; the raw values for regression. Dropout is
    off: it is exported in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(getattr(model, "temperature", 1.0))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = self.model(input_ids, attention_mask, token_type_ids)  # (B, num_labels)
        if self.model.task != "regression" and self.temperature != 1.0:
            logits = logits / self.temperature
        if self.model.task == "classification":
            return logits.float().softmax(-1)
        if self.model.task == "multilabel":
            return logits.float().sigmoid()
        return logits.float()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes on what it skips (torchvision ops) and renames (axes)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(axis name|treespec|LeafSpec).*")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _exportable(model: nn.Module) -> nn.Module:
    """The model itself when it is fp32 on the CPU, else an fp32 CPU copy (the model stays as it is)."""
    encoder = getattr(model, "encoder", None)
    if getattr(encoder, "is_quantized", False) or getattr(encoder, "is_loaded_in_4bit", False):
        raise ConfigError(
            "cannot export a model loaded with quantization='4bit'/'8bit' to ONNX: its bitsandbytes "
            "layers have no ONNX form. Merge a LoRA adapter into the full-precision encoder and export that."
        )
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).float().cpu()


def _refuse_foreign_files(directory: Path, files: list[str]) -> None:
    foreign = _atomic.foreign_files(directory, META_FILE, files)
    if foreign:
        raise ConfigError(
            f"{directory} holds files that are not an ONNX export: {foreign[:10]}; the export replaces "
            "the directory whole, which would delete them. Move them elsewhere or export into an "
            "empty or new directory."
        )


def export(model: nn.Module, directory: str | os.PathLike, *, opset: int | None = None) -> Path:
    """Write `directory` with `model.onnx`, the tokenizer files and `llmtune_onnx.json` (labels, task).

    The graph is torch's `torch.onnx.export` with the dynamo exporter (torch's default and
    maintained one; the TorchScript exporter is deprecated): inputs `input_ids`,
    `attention_mask` (and `token_type_ids` when the tokenizer makes them), int64, any
    batch size and length; output `probabilities` (softmax, or sigmoid per label for
    multi-label, as `predict_proba`) or `values` (regression), float32. LoRA adapters may
    stay unmerged; `merge()` first gives a smaller graph. A calibrated model's temperature is
    in the graph and its decision thresholds in `llmtune_onnx.json`, so the loader predicts
    as `ClassifierModel.predict` does. The directory is written whole or not at all,
    replacing an earlier export.

    Args:
        model: a `ClassifierModel` with a fast tokenizer (one with a `tokenizer.json`).
        directory: where to write.
        opset: ONNX opset version (None: the exporter's default).

    Returns:
        The directory.

    Raises:
        ImportError: onnx or onnxscript is missing (`pip install llmtune[export]`).
        ConfigError: the tokenizer is not a fast one, the model is 4/8-bit quantized or reads
            texts as sliding windows (`stride`), or `directory` holds files that are not an
            earlier export.

    Example:
        >>> model.export_onnx("model-onnx")  # doctest: +SKIP
        >>> import llmtune_onnx
        >>> llmtune_onnx.load("model-onnx").predict(["a quietly brilliant film"])  # doctest: +SKIP
    """
    _require("onnx", "onnxscript", what="ONNX export")
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"ONNX export needs a fast tokenizer (one saved as tokenizer.json, which the tokenizers "
            f"library reads); {type(tokenizer).__name__} is not one. Load the model with its fast tokenizer."
        )
    if getattr(model, "stride", None) is not None:
        raise ConfigError(
            f"this model reads long texts as windows (stride={model.stride}, aggregation="
            f"{model.aggregation!r}), which the ONNX loader does not do: it would truncate them and "
            "predict otherwise. Export a copy loaded with stride=None if truncation is what you want."
        )
    target = Path(directory)
    if target.is_dir() and any(target.iterdir()) and not (target / META_FILE).is_file():
        raise ConfigError(
            f"{target} holds files that are not an ONNX export; the export replaces the directory "
            "whole, which would delete them. Export into an empty or new directory."
        )
    net = _exportable(model)
    was_training = net.training
    example = tokenizer(
        ["a short example", "a longer example text, to export"],
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapper = Probabilities(net).eval()
    output = _OUTPUTS[net.task]
    size = sum(p.numel() * p.element_size() for p in net.parameters())
    meta = {
        "format": FORMAT,
        "task": net.task,
        "labels": net.labels,
        "inputs": inputs,
        "output": output,
        "max_length": net.max_length,
        "pad_id": int(tokenizer.pad_token_id),
        "empty_id": empty_id(tokenizer),  # what an empty text reads as (`_tokens.encode`)
        "pad_left": tokenizer.padding_side == "left",
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        # Whether "[SEP]" written in a text is that token or its characters: not in tokenizer.json.
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        "thresholds": getattr(model, "thresholds", None),
        "threshold": getattr(model, "threshold", None),
    }

    def write(tmp: Path) -> None:
        with _quiet_exporter():
            torch.onnx.export(
                wrapper,
                tuple(example[name] for name in inputs),
                str(tmp / MODEL_FILE),
                input_names=inputs,
                output_names=[output],
                dynamic_shapes={name: {0: batch, 1: length} for name in inputs},
                opset_version=opset,
                dynamo=True,
                external_data=size > 1_500_000_000,  # protobuf holds at most 2 GB in one file
                verbose=False,
            )
        tokenizer.save_pretrained(tmp)
        files = sorted({p.name for p in tmp.iterdir()} | {META_FILE, QUANTIZED_FILE})
        _refuse_foreign_files(target, files)
        # The list of files tells the next export which ones in the directory are the export's.
        (tmp / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2))

    try:
        _atomic.write_atomically(target, write)
    finally:
        net.train(was_training)
    return target


def quantize(directory: str | os.PathLike) -> Path:
    """Add `model.int8.onnx` to an export: weights in int8, activations quantized on the fly.

    onnxruntime's `quantize_dynamic` (per-tensor int8 weights). Load it with
    `llmtune_onnx.load(directory, quantized=True)`. On a CPU it is faster and 4x smaller, at
    a small cost in accuracy: measure it on your test data (benchmarks/README.md has ours).

    Raises:
        ImportError: onnxruntime is missing (`pip install llmtune[export]`).
    """
    _require("onnxruntime", what="quantize")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    directory = Path(directory)
    quantize_dynamic(directory / MODEL_FILE, directory / QUANTIZED_FILE, weight_type=QuantType.QInt8)
    return directory / QUANTIZED_FILE
