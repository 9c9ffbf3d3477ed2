"""ClassifierModel: a pretrained encoder + pooling + dropout + a linear head, with its tokenizer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import _atomic, _card, _families, _loading, _pooling, _runtime
from ._batching import Tokenized, ensure_pad_token, padding
from ._labels import TASKS
from ._layers import find_layers
from ._loading import HEAD_CONFIG, HEAD_FORMAT, HEAD_WEIGHTS
from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from .tuning import TuningStrategy

__all__ = ["ClassifierModel"]

logger = logging.getLogger("llmtune")


def _enable_checkpointing(encoder: nn.Module) -> None:
    if not getattr(encoder, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(encoder).__name__} does not support gradient checkpointing")
    # Non-reentrant: gradients reach LoRA adapters inside frozen layers without the
    # inputs-require-grad workaround the reentrant version needs (peft #1142).
    options = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _text_list(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"predict takes a list of texts, not one string; wrap it: [text] ({name})")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{name}[{i}] is {text!r} ({type(text).__name__}), not a string.")
    return texts


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


class ClassifierModel(nn.Module):
    """Encoder + pooling + dropout + linear head; `forward` returns logits.

    Args:
        encoder: a transformers base model (`AutoModel`), returning `last_hidden_state`.
        tokenizer: the encoder's tokenizer.
        labels: label names in id order (classification, multi-label); None for regression.
        task: "classification", "multilabel" or "regression".
        num_labels: output width; defaults to len(labels), or 1 for regression.
        pooling: "cls" (first token), "mean" (mean over non-pad tokens), "last" (the last
            non-pad token: a decoder's summary of the whole text) or "auto": "last" for a
            decoder, else what a sentence-transformers checkpoint was trained with, else "cls".
        dropout: dropout before the head; None takes the encoder's hidden dropout.
        max_length: longest input in tokens; longer texts are truncated. Default: the
            tokenizer's limit, at most 512 and at most the encoder's positions.
        seed: seeds the head's initialisation, so the same seed gives the same model in
            every process (torch seeds its own generator at random); None draws from torch's.
        gradient_checkpointing: recompute each layer's activations in backward instead of
            keeping them: less memory for more compute, for long inputs and large models.

    Raises:
        ConfigError: unknown task or pooling, labels that contradict `num_labels`, empty or
            duplicate labels, a `max_length` beyond the encoder's positions, or a tokenizer
            with neither a pad nor an end-of-sequence token to pad with.

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
        pooling: str = "auto",
        dropout: float | None = None,
        max_length: int | None = None,
        seed: int | None = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        pooling = _pooling.resolve(pooling, encoder.config, getattr(encoder, "name_or_path", ""))
        if pooling not in _pooling.POOLINGS:
            raise ConfigError(f"pooling must be one of {tuple(_pooling.POOLINGS)}, got {pooling!r}")
        labels = [str(x) for x in labels] if labels is not None else None
        if labels is not None and (not labels or len(set(labels)) != len(labels)):
            raise ConfigError(f"labels must be distinct names, at least one; got {labels}")
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
        self.max_length = _families.max_length(max_length, tokenizer, config)
        ensure_pad_token(tokenizer)
        # A decoder's positions follow the mask and it keeps no KV cache (see `encode`).
        self.decoder = _families.family(config).decoder
        if gradient_checkpointing:
            _enable_checkpointing(encoder)
        width = len(labels) if labels is not None else (num_labels or 1)
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(config.hidden_size, width)
        self.seed = seed
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            std = getattr(config, "initializer_range", 0.02)
            drawn = torch.empty(self.head.weight.shape, device="cpu").normal_(0.0, std, generator=generator)
            self.head.weight.copy_(drawn)
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
        seed: int | None = 0,
        gradient_checkpointing: bool = False,
        quantization: str | None = None,
        **encoder_kwargs: Any,
    ) -> ClassifierModel:
        """Load an encoder and tokenizer by Hub name or local directory, and add a new head.

        A directory written by `save_pretrained` reloads with its head, labels and settings.
        `pooling="auto"` is "last" for a decoder LLM; for an encoder, the pooling the
        checkpoint was trained with when it says (sentence-transformers'
        `1_Pooling/config.json`), else CLS. Extra keyword arguments go to
        `AutoModel.from_pretrained` (e.g. `dtype=torch.bfloat16`, `attn_implementation`,
        `revision`). `quantization="4bit"` or `"8bit"` loads the weights quantized through
        bitsandbytes on a CUDA GPU, for LoRA on top (QLoRA).

        A LoRA directory (adapter + head, see `llmtune.LoRA`) loads its adapter on top of the
        base encoder it recorded, or on `base` (Hub name or directory) when given.

        Raises:
            ConfigError: a local path that does not exist, a directory without tokenizer
                files, or arguments that contradict a saved model's labels, task or pooling.
            CheckpointError: encoder weights missing or not fitting the config, a damaged
                file, NaN weights, or a head file from a newer llmtune.
        """
        directory = _loading.local_or_hub(name_or_dir)
        saved = _loading.read_head(directory)
        tuning = (saved or {}).get("tuning") or {}
        source = _loading.adapter_base(directory, tuning, base)
        encoder = _loading.load_encoder(str(source), quantization, **encoder_kwargs)
        tokenizer = _loading.load_tokenizer(directory, getattr(encoder.config, "vocab_size", None))
        if saved is None:
            pooling = _pooling.resolve(pooling, encoder.config, directory)
            if task is None:
                task = "regression" if labels is None and num_labels in (None, 1) else "classification"
            options = dict(labels=labels, task=task, num_labels=num_labels, pooling=pooling, dropout=dropout)
            options |= dict(max_length=max_length, seed=seed, gradient_checkpointing=gradient_checkpointing)
            return cls(encoder, tokenizer, **options)
        given = {"labels": None if labels is None else [str(x) for x in labels], "task": task}
        given |= {"num_labels": num_labels, "pooling": None if pooling == "auto" else pooling}
        clash = [f"{k}={v!r}" for k, v in given.items() if v is not None and v != saved[k]]
        if clash:
            trained = ", ".join(f"{k} {saved[k]!r}" for k in given)
            raise ConfigError(
                f"{directory} was trained with {trained}; {', '.join(clash)} contradict it. Leave "
                "them out to load it as saved, or load its encoder into a new model."
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
            seed=seed,
            gradient_checkpointing=gradient_checkpointing,
        )
        _loading.load_head(model.head, directory)
        if tuning.get("name") == "LoRA":
            from .tuning import LoRA

            LoRA.attach(model, directory, tuning)
        _loading.check_finite(model, directory)
        return model

    def head_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "labels": self.labels,
            "task": self.task,
            "num_labels": self.head.out_features,
            "pooling": self.pooling,
            "dropout": self.dropout_p,
            "max_length": self.max_length,
            "format": HEAD_FORMAT,
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
            with _loading.quiet_transformers():
                self.encoder.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            head = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
            save_file(head, tmp / HEAD_WEIGHTS)
            _card.write_card(self, tmp, target.name)  # README.md, after peft's adapter card: ours wins
            files = sorted({p.name for p in tmp.iterdir()} | {HEAD_CONFIG})
            _refuse_foreign_files(target, files)
            # The list of files tells the next save which ones in the directory are the model's.
            (tmp / HEAD_CONFIG).write_text(json.dumps({**self.head_config(), "files": files}, indent=2))

        _atomic.write_atomically(target, write)

    def export_onnx(self, directory: str | os.PathLike, **options: Any) -> Path:
        """Write an ONNX graph of `predict_proba` (raw values for regression) with its tokenizer and labels.

        The graph takes `input_ids` and `attention_mask` (and `token_type_ids` where the
        tokenizer makes them) of any batch size and length. `llmtune_onnx.load(directory)`
        predicts from it with onnxruntime and tokenizers alone. See `llmtune.onnx.export`.

        Example:
            >>> model.export_onnx("model-onnx")  # doctest: +SKIP
        """
        from .onnx import export

        return export(self, directory, **options)

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

    def encoder_layers(self) -> nn.ModuleList | None:
        """The encoder's stacked blocks, one module per layer (None: they cannot be told apart).

        Found from the module structure (`_layers.find_layers`); `TopLayers` and layer-wise
        LR decay both ask here. Override for an encoder whose layers it does not find.
        """
        return find_layers(self.encoder)

    # -- forward ------------------------------------------------------------------------

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled encoder features, shape (B, hidden)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.decoder:
            # Positions count real tokens only, so a left-padded row is where it is alone;
            # and a classifier reads each text once: no KV cache.
            inputs |= {"position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0), "use_cache": False}
        hidden = self.encoder(**inputs).last_hidden_state  # (B, T, H)
        return _pooling.POOLINGS[self.pooling](hidden, attention_mask)  # (B, H)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Head on pooled features: dropout + linear, shape (B, num_labels)."""
        # The head stays fp32 when the encoder's weights are bf16 (from_pretrained(dtype=...)).
        return self.head(self.dropout(features.to(self.head.weight.dtype)))

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
        texts = _text_list(texts, "texts")
        pairs = None if text_pairs is None else _text_list(text_pairs, "text_pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise DataError(f"{len(texts)} texts but {len(pairs)} text_pairs.")
        if not texts:
            return np.zeros((0, self.head.out_features), dtype=np.float32)
        pad = padding(self.tokenizer)
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        data = Tokenized.from_rows(enc["input_ids"], enc.get("token_type_ids"), None, **pad)
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
