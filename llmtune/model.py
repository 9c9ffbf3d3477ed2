"""ClassifierModel: a pretrained encoder + pooling + dropout + a linear head, with its tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import _atomic, _runtime
from ._batching import Tokenized
from ._labels import TASKS
from .errors import ConfigError

if TYPE_CHECKING:
    from .tuning import TuningStrategy

__all__ = ["ClassifierModel"]

HEAD_CONFIG = "llmtune_head.json"
HEAD_WEIGHTS = "llmtune_head.safetensors"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # transformers prints a load report for the pooler weights we drop on purpose.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _adapter_base(name_or_dir: str | os.PathLike, tuning: dict[str, Any], base: Any) -> Any:
    """Where the encoder weights come from: the directory itself, or a LoRA adapter's base."""
    if tuning.get("name") != "LoRA":
        if base is not None:
            raise ConfigError(f"base= is for LoRA adapter directories; {name_or_dir} holds a full model")
        return name_or_dir
    source = base or tuning.get("base_model")
    if not source:
        raise ConfigError(
            f"{name_or_dir} holds a LoRA adapter without a record of its base encoder; "
            "pass base=<the encoder's name or directory>"
        )
    return source


def _refuse_foreign_files(directory: Path, files: list[str]) -> None:
    """Refuse to replace a directory holding files that its saved model did not write.

    The previous save's list of files says which are the model's; without one (an older
    llmtune, or another tool), the files this save writes are taken for the model's.
    """
    if not directory.is_dir():
        return
    try:
        ours = set(json.loads((directory / HEAD_CONFIG).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        ours = set(files)
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in ours)
    if foreign:
        raise ConfigError(
            f"{directory} holds files that are not part of a saved model: {foreign[:10]}. "
            "save_pretrained replaces the directory whole (so that it always holds one complete "
            "model), which would delete them; move them elsewhere or save into another directory."
        )


def checkpoint_pooling(name_or_dir: str | os.PathLike, **hub_kwargs: Any) -> str:
    """The pooling a sentence-transformers checkpoint was trained with ("mean"/"cls"), else "cls"."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            str(name_or_dir),
            "1_Pooling/config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except OSError:
        path = None
    if path is None:
        return "cls"
    config = json.loads(Path(path).read_text())
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


class ClassifierModel(nn.Module):
    """Encoder + pooling + dropout + linear head; `forward` returns logits.

    Args:
        encoder: a transformers base model (`AutoModel`), returning `last_hidden_state`.
        tokenizer: the encoder's tokenizer.
        labels: label names in id order (classification, multi-label); None for regression.
        task: "classification", "multilabel" or "regression".
        num_labels: output width; defaults to len(labels), or 1 for regression.
        pooling: "cls" (first token) or "mean" (mean over non-pad tokens).
        dropout: dropout before the head; None takes the encoder's hidden dropout.
        max_length: longest input in tokens; longer texts are truncated.

    Example:
        >>> model = ClassifierModel.from_pretrained("bert-base-uncased", labels=["neg", "pos"])
        >>> model.predict(["a quietly brilliant film"])  # doctest: +SKIP
        ['pos']
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        *,
        labels: Sequence[Any] | None = None,
        task: str = "classification",
        num_labels: int | None = None,
        pooling: str = "cls",
        dropout: float | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        labels = [str(x) for x in labels] if labels is not None else None
        if task != "regression" and labels is None and num_labels is None:
            raise ConfigError(f"a {task} model needs labels=[...] or num_labels=N")
        if labels is not None and num_labels is not None and num_labels != len(labels):
            raise ConfigError(f"num_labels={num_labels} but {len(labels)} labels were given: {labels}")
        if labels is None and task != "regression":
            labels = [str(i) for i in range(num_labels)]
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.labels = labels
        self.task = task
        self.pooling = pooling
        config = encoder.config
        self.dropout_p = getattr(config, "hidden_dropout_prob", 0.1) if dropout is None else dropout
        model_max = getattr(tokenizer, "model_max_length", 512)
        self.max_length = max_length or min(model_max if model_max < 10**6 else 512, 512)
        width = len(labels) if labels is not None else (num_labels or 1)
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(config.hidden_size, width)
        nn.init.normal_(self.head.weight, std=getattr(config, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)
        self.tuning: TuningStrategy | None = None  # set by tune(); None: every parameter trains

    # -- construction and persistence ------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike,
        *,
        labels: Sequence[Any] | None = None,
        num_labels: int | None = None,
        task: str | None = None,
        pooling: str = "auto",
        dropout: float | None = None,
        max_length: int | None = None,
        base: str | os.PathLike | None = None,
        **encoder_kwargs: Any,
    ) -> ClassifierModel:
        """Load an encoder and tokenizer by Hub name or local directory, and add a new head.

        A directory written by `save_pretrained` reloads with its head, labels and settings.
        `pooling="auto"` uses the pooling the checkpoint was trained with when it says
        (sentence-transformers' `1_Pooling/config.json`), else CLS. Extra keyword arguments
        go to `AutoModel.from_pretrained` (e.g. `attn_implementation`, `revision`).

        A LoRA directory (adapter + head, see `llmtune.LoRA`) loads its adapter on top of the
        base encoder it recorded, or on `base` (Hub name or directory) when given.
        """
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        head_file = Path(name_or_dir) / HEAD_CONFIG
        saved = json.loads(head_file.read_text()) if head_file.is_file() else None
        tuning = (saved or {}).get("tuning") or {}
        source = _adapter_base(name_or_dir, tuning, base)
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
            try:
                encoder = AutoModel.from_pretrained(source, add_pooling_layer=False, **encoder_kwargs)
            except TypeError:  # encoders without a pooler layer do not take the argument
                encoder = AutoModel.from_pretrained(source, **encoder_kwargs)
        if saved is not None:
            if labels is not None and [str(x) for x in labels] != saved["labels"]:
                raise ConfigError(
                    f"{name_or_dir} was trained with labels {saved['labels']}, not {list(labels)}"
                )
            model = cls(
                encoder,
                tokenizer,
                labels=saved["labels"],
                task=saved["task"],
                num_labels=saved["num_labels"],
                pooling=saved["pooling"],
                dropout=saved["dropout"] if dropout is None else dropout,
                max_length=max_length or saved["max_length"],
            )
            model.head.load_state_dict(load_file(Path(name_or_dir) / HEAD_WEIGHTS))
            if tuning.get("name") == "LoRA":
                from .tuning import LoRA

                LoRA.attach(model, name_or_dir, tuning)
            return model
        if pooling == "auto":
            pooling = checkpoint_pooling(name_or_dir)
        if task is None:
            task = "regression" if labels is None and num_labels in (None, 1) else "classification"
        return cls(
            encoder,
            tokenizer,
            labels=labels,
            task=task,
            num_labels=num_labels,
            pooling=pooling,
            dropout=dropout,
            max_length=max_length,
        )

    def head_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "labels": self.labels,
            "task": self.task,
            "num_labels": self.head.out_features,
            "pooling": self.pooling,
            "dropout": self.dropout_p,
            "max_length": self.max_length,
        }
        if self.tuning is not None:  # LoRA's record says which base encoder the adapter needs
            config["tuning"] = self.tuning.record(self)
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write encoder (safetensors + config), tokenizer, head weights and label names.

        With LoRA adapters the encoder part is only the adapter (peft's layout) plus a record
        of the base encoder, megabytes instead of the whole encoder; `merge()` first to write
        a full model.

        All or nothing: the files go into a hidden sibling directory that then replaces
        `directory` in one step, so `directory` always holds the old model or the new one,
        whole, even when the process is killed or the disk fills up. As the directory is
        replaced whole, saving over one that holds files this method did not write (a model
        card you added, logs) is refused rather than deleting them.

        Raises:
            ConfigError: `directory` holds files that are not part of a saved model.
            OSError: the files could not be written (a full disk); `directory` is unchanged.
        """
        from safetensors.torch import save_file

        target = Path(directory)

        def write(tmp: Path) -> None:
            with _quiet_transformers():
                self.encoder.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            head = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
            save_file(head, tmp / HEAD_WEIGHTS)
            files = sorted({p.name for p in tmp.iterdir()} | {HEAD_CONFIG})
            _refuse_foreign_files(target, files)
            # The list of files tells the next save which ones in the directory are the model's.
            (tmp / HEAD_CONFIG).write_text(json.dumps({**self.head_config(), "files": files}, indent=2))

        _atomic.write_atomically(target, write)

    # -- tuning -------------------------------------------------------------------------

    def tune(self, strategy: TuningStrategy) -> ClassifierModel:
        """Choose which parameters train: `Full()`, `HeadOnly()`, `TopLayers(k)`, `BitFit()`, `LoRA(...)`.

        Changes the model in place (LoRA wraps the encoder) and returns it; the head always
        trains. With a frozen encoder (HeadOnly) FineTuner caches encoder features.

        Example:
            >>> from llmtune import LoRA
            >>> model = model.tune(LoRA(r=8))  # doctest: +SKIP
        """
        return strategy.apply(self)

    def merge(self) -> ClassifierModel:
        """Fold LoRA adapters into the encoder weights for zero-overhead inference; returns the model.

        Afterwards it is a plain model (every parameter trains, `save_pretrained` writes it whole).

        Raises:
            ConfigError: the model has no LoRA adapters.
        """
        from .tuning import merge_adapters

        return merge_adapters(self)

    # -- forward ------------------------------------------------------------------------

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled encoder features, shape (B, hidden)."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Head on pooled features: dropout + linear, shape (B, num_labels)."""
        return self.head(self.dropout(features))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Logits, shape (B, num_labels). Extra batch keys (e.g. labels) are ignored.

        `features` (B, hidden), pooled encoder outputs cached earlier, skip the encoder.
        """
        if features is not None:
            return self.classify(features)
        return self.classify(self.encode(input_ids, attention_mask, token_type_ids))

    # -- inference ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.inference_mode()
    def outputs(self, data: Tokenized, batch_size: int = 64, indices: np.ndarray | None = None) -> np.ndarray:
        """Raw outputs for tokenized examples (all, or those at `indices`), in that order, in eval mode.

        Batches go in length order so each pads little; the outputs are put back in place.
        Returns shape (N, num_labels), or (len(indices), num_labels).
        """
        chosen = np.arange(len(data)) if indices is None else np.asarray(indices)
        out = np.empty((len(chosen), self.head.out_features), dtype=np.float32)
        order = np.argsort(data.lengths[chosen], kind="stable")
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = data.collate(chosen[rows])
                batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
                out[rows] = self(**batch).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def logits(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        precision: str = "auto",
    ) -> np.ndarray:
        """Raw outputs for a list of texts, shape (N, num_labels).

        `precision` as in FineTuner: "auto" runs bf16 autocast where the hardware computes bf16
        natively (CUDA, CPUs with AVX-512 BF16 or AMX: ~2-4x faster, outputs within ~1e-2),
        else fp32; "fp32" gives exact outputs.
        """
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts, not one string; wrap it: [text]")
        texts = list(texts)
        pairs = list(text_pairs) if text_pairs is not None else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        data = Tokenized.from_rows(
            enc["input_ids"], enc.get("token_type_ids"), None, int(self.tokenizer.pad_token_id)
        )
        with _runtime.autocast(self.device, _runtime.resolve_precision(precision, self.device)):
            return self.outputs(data, batch_size)

    def predict_proba(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        precision: str = "auto",
    ) -> np.ndarray:
        """Class probabilities (softmax; sigmoid per label for multi-label), shape (N, num_labels)."""
        if self.task == "regression":
            raise ConfigError("predict_proba has no meaning for regression; use predict")
        logits = torch.from_numpy(self.logits(texts, text_pairs, batch_size, precision))
        probs = logits.sigmoid() if self.task == "multilabel" else logits.softmax(-1)
        return probs.numpy()

    def predict(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        threshold: float = 0.5,
        precision: str = "auto",
    ) -> list[Any]:
        """Label names (classification), lists of names (multi-label, sigmoid >= threshold),
        or floats (regression), one per text."""
        if self.task == "regression":
            out = self.logits(texts, text_pairs, batch_size, precision)
            return out[:, 0].tolist() if out.shape[1] == 1 else out.tolist()
        probs = self.predict_proba(texts, text_pairs, batch_size, precision)
        assert self.labels is not None
        if self.task == "multilabel":
            return [[self.labels[j] for j in np.flatnonzero(row >= threshold)] for row in probs]
        return [self.labels[i] for i in probs.argmax(-1)]
