"""ClassifierModel: a pretrained encoder + pooling + dropout + a linear head, with its tokenizer."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _atomic, _card, _families, _loading, _pooling, _vocabulary
from ._inference import Inference
from ._labels import TASKS
from ._layers import find_layers
from ._loading import HEAD_CONFIG, HEAD_FORMAT, HEAD_WEIGHTS
from ._tokens import AGGREGATIONS, ensure_pad_token
from .errors import ConfigError

if TYPE_CHECKING:
    from .data import DatasetAdapter
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


LARGE_VOCABULARY = 100_000


def _freeze_large_vocabulary(encoder: nn.Module) -> None:
    """Freeze the word embeddings of a vocabulary of 100,000 rows or more, by default.

    In multilingual-e5-small they are 96M of 117M weights: training them kept test accuracy on
    Chinese reviews (0.833 vs 0.837 frozen, benchmarks/multilingual.py) while AdamW's state
    for them took 1.3 GB and every step 1.7x as long. A text touches a few hundred rows; the
    rest would only decay. `model.tune(Full())` trains them too.
    """
    embedding = encoder.get_input_embeddings() if hasattr(encoder, "get_input_embeddings") else None
    if isinstance(embedding, nn.Embedding) and embedding.num_embeddings >= LARGE_VOCABULARY:
        embedding.weight.requires_grad_(False)
        logger.info(
            "word embeddings (%d x %d) frozen: a large vocabulary trains slowly and gains nothing; "
            "model.tune(Full()) trains them",
            *embedding.weight.shape,
        )


def _check_pad_id(encoder: nn.Module, tokenizer: Any) -> None:
    """Refuse a pad token the encoder has no embedding row for: every padded batch would fail
    with torch's "index out of range" (a pad token added to a decoder's tokenizer, unresized)."""
    embedding = encoder.get_input_embeddings() if hasattr(encoder, "get_input_embeddings") else None
    if isinstance(embedding, nn.Embedding) and tokenizer.pad_token_id >= embedding.num_embeddings:
        raise ConfigError(
            f"the pad token {tokenizer.pad_token!r} is id {tokenizer.pad_token_id}, but the encoder's "
            f"embedding has {embedding.num_embeddings} rows: resize it, "
            "encoder.resize_token_embeddings(len(tokenizer)), or pad with a token it has, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token."
        )


def _window_settings(stride: int | None, aggregation: str, tokenizer: Any, max_length: int) -> tuple:
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    special = tokenizer.num_special_tokens_to_add()
    room = max_length - special  # text tokens in one window
    if room < 1:  # the tokenizer ignores a max_length of 0 or 1, and at `special` keeps no text
        raise ConfigError(
            f"max_length={max_length} leaves no room for text: the tokenizer adds {special} special "
            f"tokens to each text; pass max_length > {special}."
        )
    if stride is not None and not (isinstance(stride, int) and 0 <= stride < room):
        raise ConfigError(
            f"stride={stride!r}: the overlap of two windows must be an int in [0, {room}) at "
            f"max_length={max_length} (each window holds {room} tokens of text)."
        )
    return stride, aggregation


def _refuse_foreign_files(directory: Path, files: list[str]) -> None:
    foreign = _atomic.foreign_files(directory, HEAD_CONFIG, files)
    if foreign:
        raise ConfigError(
            f"{directory} holds files that are not part of a saved model: {foreign[:10]}. "
            "save_pretrained replaces the directory whole (so that it always holds one complete "
            "model), which would delete them; move them elsewhere or save into another directory."
        )


class ClassifierModel(Inference, nn.Module):
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
        stride: None truncates texts to `max_length`. A number reads a longer text as
            overlapping windows of `max_length` tokens with `stride` tokens of overlap, in
            training, evaluation and prediction alike; each window is a training example
            with its text's label, and a text's output is its windows' `aggregation`.
        aggregation: how windows make a text's output: "mean" or "max" of their logits.

    Raises:
        ConfigError: unknown task or pooling, labels that contradict `num_labels`, empty or
            duplicate labels, a `max_length` beyond the encoder's positions or with no room
            for text beside the special tokens, or a tokenizer
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
        stride: int | None = None,
        aggregation: str = "mean",
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
        _check_pad_id(encoder, tokenizer)
        self.stride, self.aggregation = _window_settings(stride, aggregation, tokenizer, self.max_length)
        # A decoder's positions follow the mask and it keeps no KV cache (see `encode`).
        self.decoder = _families.family(config).decoder
        if not self.decoder and getattr(tokenizer, "padding_side", "right") == "left":
            # An encoder numbers positions from column 0: padding on the left would move a
            # short text's tokens, and its outputs would depend on the batch it is in.
            tokenizer.padding_side = "right"
            logger.info("tokenizer pads on the left; an encoder's is set to pad on the right")
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
        placed = next((p.device for p in encoder.parameters()), torch.device("cpu"))
        if placed.type != "cpu":  # loaded onto a GPU (quantization, device_map): the head joins it
            self.head.to(placed)
        self.tuning: TuningStrategy | None = None  # set by tune(); None: the default below
        _freeze_large_vocabulary(encoder)

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
        stride: int | None = None,
        aggregation: str | None = None,
        **encoder_kwargs: Any,
    ) -> ClassifierModel:
        """Load an encoder and tokenizer by Hub name or local directory, and add a new head.

        A directory written by `save_pretrained` reloads with its head, labels and settings
        (pooling, max length, windows, calibration); `dropout`, `max_length`, `stride` and
        `aggregation` given here replace the saved ones.
        `pooling="auto"` is "last" for a decoder LLM; for an encoder, the pooling the
        checkpoint was trained with when it says (sentence-transformers'
        `1_Pooling/config.json`), else CLS. Extra keyword arguments go to
        `AutoModel.from_pretrained` (e.g. `dtype=torch.bfloat16`, `attn_implementation`,
        `revision`). `quantization="4bit"` or `"8bit"` loads the weights quantized through
        bitsandbytes on a CUDA GPU, for LoRA on top (QLoRA: `model.tune(LoRA())`; the
        quantized weights cannot train, so `Full()` and `TopLayers` are refused).

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
        settings = dict(dropout=dropout, max_length=max_length, stride=stride, aggregation=aggregation)
        runtime = dict(seed=seed, gradient_checkpointing=gradient_checkpointing)
        if saved is None:
            if task is None:
                task = "regression" if labels is None and num_labels in (None, 1) else "classification"
            settings["aggregation"] = aggregation or "mean"
            pooling = _pooling.resolve(pooling, encoder.config, directory)
            options = dict(labels=labels, task=task, num_labels=num_labels, pooling=pooling)
            return cls(encoder, tokenizer, **options, **settings, **runtime)
        given = {"labels": None if labels is None else [str(x) for x in labels], "task": task}
        given |= {"num_labels": num_labels, "pooling": None if pooling == "auto" else pooling}
        clash = [f"{k}={v!r}" for k, v in given.items() if v is not None and v != saved[k]]
        if clash:
            trained = ", ".join(f"{k} {saved[k]!r}" for k in given)
            raise ConfigError(
                f"{directory} was trained with {trained}; {', '.join(clash)} contradict it. Leave "
                "them out to load it as saved, or load its encoder into a new model."
            )
        settings = {k: saved.get(k) if v is None else v for k, v in settings.items()}
        settings["aggregation"] = settings["aggregation"] or "mean"
        options = {k: saved[k] for k in ("labels", "task", "num_labels", "pooling")}
        model = cls(encoder, tokenizer, **options, **settings, **runtime)
        # A calibration holds for the outputs it was fitted to: the same reading of the texts.
        reading = ("max_length", "stride", "aggregation")
        if all(getattr(model, k) == saved.get(k, getattr(model, k)) for k in reading):
            model.temperature = saved.get("temperature", 1.0)
            model.thresholds, model.threshold = saved.get("thresholds"), saved.get("threshold")
        elif saved.get("temperature", 1.0) != 1.0 or saved.get("thresholds") or saved.get("threshold"):
            logger.warning(
                "%s: its calibration was fitted with max_length, stride, aggregation = %s; they are "
                "%s now, so it is dropped: calibrate again",
                directory,
                [saved.get(k) for k in reading],
                [getattr(model, k) for k in reading],
            )
        _loading.load_head(model.head, directory)
        model.training_record = saved.get("training_record")
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
            "stride": self.stride,
            "aggregation": self.aggregation,
            "temperature": self.temperature,
            "thresholds": self.thresholds,
            "threshold": self.threshold,
            "format": HEAD_FORMAT,
        }
        if self.tuning is not None:  # LoRA's record says which base encoder the adapter needs
            config["tuning"] = self.tuning.record(self)
        if getattr(self, "training_record", None):  # the card of a reloaded, re-saved model keeps it
            config["training_record"] = self.training_record
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

    def extend_vocabulary(self, data: DatasetAdapter | Sequence[str], min_count: int = 2) -> list[str]:
        """Add what the tokenizer reads as its unknown token in `data` as new tokens; returns them.

        Each stretch of text (a character, a word) read as unknown at least `min_count` times,
        and each pair of adjacent ones seen 5 times or more, becomes a token with its own
        embedding row around the existing rows (placed by its contexts in the text when there
        are 500 texts or fewer: +1.5 points at 8 and 64 Chinese reviews a class) and trained at
        the head's learning rate while the pretrained rows stay fixed. For text the vocabulary
        was not made for: all-MiniLM-L6-v2 reads 64% of Chinese reviews as [UNK]; on 1,000 of
        them it scores 65.0% as it is and 77.0% with the new tokens (TF-IDF 78.1%,
        docs/quality.md).
        `FineTuner` does this by itself when 5% or more of the training tokens are unknown
        (`FineTuner(extend_vocabulary=)`).
        Call it before `tune()`: strategies that freeze the embeddings (HeadOnly, LoRA, BitFit,
        TopLayers) leave the new rows as drawn. Give it the training data only. A larger
        vocabulary than `LARGE_VOCABULARY` then trains its embedding too (AdamW state for it).

        Raises:
            ConfigError: the tokenizer is not a fast one, the input embedding is not an
                `nn.Embedding`, a strategy other than `Full()` was applied already, or the
                encoder was frozen by hand.
        """
        if not _vocabulary.may_grow(self):
            done = f"tune({type(self.tuning).__name__}(...))" if self.tuning else "freezing the encoder"
            raise ConfigError(
                f"extend_vocabulary after {done}: the new rows would not train (or would unfreeze "
                "the embedding); call it before"
            )
        if hasattr(data, "dataset"):  # a DatasetAdapter: both texts of a pair
            texts = list(data.dataset["text"]) + (list(data.dataset["text_pair"]) if data.has_pairs else [])
        else:
            texts = list(data)
        spans = _vocabulary.unknown_spans(self.tokenizer, texts, min_count)
        if not spans:
            return []
        # A copy: a tokenizer shared with another model would hand it ids its embedding lacks.
        self.tokenizer = copy.deepcopy(self.tokenizer)
        added = self.tokenizer.add_tokens(spans)
        ids = self.tokenizer.convert_tokens_to_ids(spans)
        _vocabulary.add_rows(self.encoder, self.tokenizer, texts, ids, self.seed)
        logger.info("added %d tokens to the vocabulary (%d new), e.g. %s", len(spans), added, spans[:5])
        return spans

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
