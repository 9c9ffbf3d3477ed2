"""Tuning strategies: which parameters of a ClassifierModel train (Full, HeadOnly, TopLayers, BitFit, LoRA).

Also the feature cache that lets head-only training run the frozen encoder once per example.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from . import _families, _runtime
from ._layers import layer_depths, layers_of
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ._batching import BatchLoader
    from .distributed import DistributedContext
    from .model import ClassifierModel

__all__ = [
    "TuningStrategy",
    "Full",
    "HeadOnly",
    "TopLayers",
    "BitFit",
    "LoRA",
    "ParameterCounts",
    "count_parameters",
    "FeatureLoader",
]

logger = logging.getLogger("llmtune")

PEFT_MISSING = "LoRA needs the peft package, an optional extra: pip install llmtune[peft]"


class ParameterCounts(NamedTuple):
    """Trainable and total parameters of a model."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} of {self.total:,} parameters train ({self.fraction:.2%})"


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Trainable (requires_grad) and total parameters of `model`, each shared tensor once."""
    params = list(model.parameters())
    return ParameterCounts(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def has_adapters(model: nn.Module) -> bool:
    """True when the model's encoder is wrapped by peft (carries LoRA adapters)."""
    return hasattr(getattr(model, "encoder", None), "peft_config")


def encoder_frozen(model: nn.Module) -> bool:
    """True when the model has an encoder with parameters, none of which trains."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module) or not hasattr(model, "classify"):
        return False
    params = list(encoder.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _num_layers(model: nn.Module) -> int:
    return int(getattr(model.encoder.config, "num_hidden_layers", 0) or 0)


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError(PEFT_MISSING) from None
    return peft


@dataclass(frozen=True)
class TuningStrategy:
    """Base class: decides which encoder parameters train; the classification head always trains.

    Subclasses override `trains(name, num_layers)`, or `apply` for strategies that change the
    model's structure (LoRA). Apply one with `model.tune(strategy)`.
    """

    def trains(self, name: str, num_layers: int) -> bool:
        """Whether the encoder parameter `name` trains, given the encoder's number of layers."""
        raise NotImplementedError

    def apply(self, model: ClassifierModel) -> ClassifierModel:
        """Set `requires_grad` on every parameter of `model` in place; returns the model.

        Raises:
            ConfigError: the model carries LoRA adapters (merge them first), or the strategy
                would train weights loaded quantized (`quantization="4bit"`).
        """
        _refuse_adapters(model, self)
        num_layers = _num_layers(model)
        return _set_trainable(model, self, lambda name: self.trains(name, num_layers))

    def _finish(self, model: ClassifierModel) -> ClassifierModel:
        # The head is new and task-specific: it always trains, whatever the strategy.
        for param in model.head.parameters():
            param.requires_grad_(True)
        model.tuning = self
        logger.info("%s: %s", self, count_parameters(model))
        return model

    def counts(self, model: ClassifierModel) -> ParameterCounts:
        """Trainable and total parameters of `model`, which this strategy was applied to.

        Raises:
            ConfigError: `model` was not tuned with this strategy.
        """
        if getattr(model, "tuning", None) != self:
            raise ConfigError(f"the model was not tuned with {self}; call model.tune({self}) first")
        return count_parameters(model)

    def record(self, model: ClassifierModel) -> dict[str, Any]:
        """What `save_pretrained` writes about this strategy (JSON-serialisable)."""
        return {"name": type(self).__name__, **asdict(self)}


def quantized_weights(model: nn.Module) -> list[str]:
    """The encoder parameters stored as integers (bitsandbytes 4- and 8-bit): they cannot train."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        return []
    return [name for name, p in encoder.named_parameters() if not p.is_floating_point()]


def refuse_quantized_default(model: nn.Module) -> None:
    """Refuse to fit a quantized encoder with no strategy chosen: the default means "every
    weight trains", and its quantized weights cannot, so only its norms and embeddings would."""
    stuck = quantized_weights(model)
    if not stuck or getattr(model, "tuning", None) is not None or encoder_frozen(model):
        return
    raise ConfigError(
        f"the encoder was loaded quantized ({len(stuck)} weights such as {stuck[0]} are integers): "
        "they cannot train, so fitting it as it is would train only its norms, embeddings and "
        "head. Call model.tune(LoRA()) first (QLoRA: adapters train beside the quantized "
        "weights), or model.tune(HeadOnly())."
    )


def _set_trainable(
    model: ClassifierModel, strategy: TuningStrategy, trains: Callable[[str], bool]
) -> ClassifierModel:
    """Set each encoder parameter's requires_grad to `trains(name)`, then the head's."""
    params = dict(model.encoder.named_parameters())
    stuck = [name for name in quantized_weights(model) if trains(name)]
    if stuck:  # torch would refuse with "only Tensors of floating point dtype can require gradients"
        raise ConfigError(
            f"{strategy} would train {len(stuck)} encoder weights that were loaded quantized "
            f"(such as {stuck[0]}, {params[stuck[0]].dtype}), and quantized weights cannot train. "
            "Use LoRA() (QLoRA), HeadOnly() or BitFit(), or load the model without quantization."
        )
    for name, param in params.items():
        param.requires_grad_(trains(name))
    return strategy._finish(model)


def _refuse_adapters(model: nn.Module, strategy: TuningStrategy) -> None:
    if has_adapters(model):
        raise ConfigError(
            f"cannot apply {strategy}: the model already carries LoRA adapters; "
            "call model.merge() first to fold them into the encoder."
        )


@dataclass(frozen=True)
class Full(TuningStrategy):
    """Every parameter trains, the word embeddings too.

    A freshly loaded model trains everything but the word embeddings of a vocabulary of
    100,000 rows or more (multilingual encoders, some LLMs), which it freezes; `Full()`
    trains those as well.
    """

    def trains(self, name: str, num_layers: int) -> bool:
        return True


@dataclass(frozen=True)
class HeadOnly(TuningStrategy):
    """Only the head trains; FineTuner then runs the frozen encoder once and caches its features."""

    def trains(self, name: str, num_layers: int) -> bool:
        return False


@dataclass(frozen=True)
class TopLayers(TuningStrategy):
    """The last `k` encoder layers (and anything above them) train, plus the head.

    Example:
        >>> model.tune(TopLayers(2))  # doctest: +SKIP
    """

    k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"TopLayers needs k >= 1 layers, got {self.k!r}")

    def apply(self, model: ClassifierModel) -> ClassifierModel:
        """Train the top `k` layers and what sits above them (a final norm), plus the head.

        Raises:
            ConfigError: k exceeds the layers, or the encoder's layers cannot be told apart
                (ALBERT shares one set of weights across them).
        """
        _refuse_adapters(model, self)
        num_layers = len(layers_of(model))
        if self.k > num_layers:
            raise ConfigError(f"TopLayers(k={self.k}) but the encoder has {num_layers} layers")
        depths = layer_depths(model)  # layer i has depth i + 1, embeddings 0, a final norm L + 1
        return _set_trainable(model, self, lambda name: depths[name] > num_layers - self.k)

    def trains(self, name: str, num_layers: int) -> bool:
        raise NotImplementedError("TopLayers decides by depth, in apply()")


@dataclass(frozen=True)
class BitFit(TuningStrategy):
    """Only the encoder's bias terms train, plus the head (Ben Zaken et al., 2022)."""

    def trains(self, name: str, num_layers: int) -> bool:
        return name.rsplit(".", 1)[-1] == "bias"

    def apply(self, model: ClassifierModel) -> ClassifierModel:
        """Freeze all but the biases (see `TuningStrategy.apply`).

        Raises:
            ConfigError: the encoder has no bias terms (Llama, Gemma, ModernBERT): BitFit would
                quietly be HeadOnly.
        """
        if not any(self.trains(name, 0) for name, _ in model.encoder.named_parameters()):
            raise ConfigError(
                f"BitFit trains an encoder's bias terms, and this {type(model.encoder).__name__} has "
                "none: only the head would train. Use HeadOnly() for that, or LoRA()."
            )
        return super().apply(model)


@dataclass(frozen=True)
class LoRA(TuningStrategy):
    """Low-rank adapters on the `targets` linear layers through `peft`; the encoder stays frozen.

    Each target `W` becomes `W + (alpha / r) * B A` with `A` (r, in) and `B` (out, r); only
    `A`, `B` and the head train. `save_pretrained` then writes adapter + head (megabytes) and
    a record of the base encoder; `model.merge()` folds the adapters into `W`.

    Args:
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the adapter's input.
        targets: names of the linear layers to adapt (the last part of the module name,
            e.g. "query", "value" in BERT; "q_lin", "v_lin" in DistilBERT). None: the
            family's attention query and value projections (q_proj/v_proj in Llama, Qwen2
            and Gemma; c_attn in GPT-2; see `_families`).

    Raises:
        ImportError: peft is not installed (`pip install llmtune[peft]`).

    Example:
        >>> model = ClassifierModel.from_pretrained("bert-base-uncased", labels=["n", "p"])  # doctest: +SKIP
        >>> model = model.tune(LoRA(r=8))  # doctest: +SKIP
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.targets is None:
            return self._check_numbers()
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)  # lists (e.g. from JSON) become tuples
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"LoRA targets must be module names like ('query', 'value'), got {targets!r}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be an int >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    def trains(self, name: str, num_layers: int) -> bool:
        return "lora_" in name

    def apply(self, model: ClassifierModel) -> ClassifierModel:
        """Wrap `model.encoder` in peft LoRA adapters (the base weights freeze); returns the model.

        Raises:
            ImportError: peft is missing.
            ConfigError: a target names no linear layer, or the model already has adapters.
        """
        from transformers.pytorch_utils import Conv1D

        peft = _import_peft()
        _refuse_adapters(model, self)
        kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in model.encoder.named_modules()}
        linear = sorted(name for name, kind in kinds.items() if issubclass(kind, (nn.Linear, Conv1D)))
        targets = self.targets or _families.family(model.encoder.config).lora_targets
        if targets is None:
            raise ConfigError(
                f"LoRA has no default targets for {model.encoder.config.model_type}; pass "
                f"LoRA(targets=(...)) naming its attention projections, from {linear}"
            )
        missing = sorted(set(targets) - set(linear))
        if missing:
            raise ConfigError(f"LoRA targets {missing} are not linear layers of the encoder; it has {linear}")
        config = peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(targets),
            fan_in_fan_out=any(issubclass(kinds[t], Conv1D) for t in targets),  # GPT-2's (in, out) weights
        )
        seed = getattr(model, "seed", None)
        # The adapters' A matrices are drawn here, before FineTuner seeds anything: from the
        # model's own seed, so the same seed gives the same adapters in every process.
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None), warnings.catch_warnings():
            if seed is not None:
                torch.manual_seed(seed)
            # peft 0.21 asks transformers 5 a deprecated question about gradient checkpointing.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model.encoder = peft.get_peft_model(model.encoder, config)
        return self._finish(model)

    def record(self, model: ClassifierModel) -> dict[str, Any]:
        """The strategy plus the base encoder it was trained on: where to load it, and a checksum."""
        base = model.encoder.get_base_model() if has_adapters(model) else model.encoder
        targets = self.targets
        if has_adapters(model):  # as resolved for this family when targets=None
            targets = tuple(sorted(model.encoder.peft_config["default"].target_modules))
        name = str(base.name_or_path or "")
        if name and Path(name).is_dir():
            name = str(Path(name).resolve())  # a relative directory would break from another cwd
        record = {**super().record(model), "targets": targets}
        # Rows a grown vocabulary added are not the base's: left out of its checksum, and the
        # base is grown to hold them again before the adapter (which saved them) loads.
        new = new_row_ranges(base)
        return {**record, "base_model": name, "base_sha256": base_checksum(base, new), "new_rows": new}

    @staticmethod
    def attach(model: ClassifierModel, directory: str | Path, record: dict[str, Any]) -> ClassifierModel:
        """Put the adapter saved in `directory` on `model`'s base encoder (trainable, as after `apply`)."""
        peft = _import_peft()
        new = record.get("new_rows") or []
        if record.get("base_sha256") not in (None, base_checksum(model.encoder, new)):
            logger.warning(
                "the base encoder's weights differ from those the adapter in %s was trained on; "
                "its predictions will differ from the saved model's",
                directory,
            )
        rows = max([len(model.tokenizer), *(end for _, end in new)])
        if rows > model.encoder.get_input_embeddings().num_embeddings:
            model.encoder.resize_token_embeddings(rows, mean_resizing=False)
        adapters = [Path(directory) / f for f in ("adapter_model.safetensors", "adapter_model.bin")]
        if not any(f.is_file() for f in adapters):  # else peft takes the directory for a Hub name
            raise CheckpointError(f"{directory} has no adapter_model.safetensors (a damaged LoRA directory)")
        quiet = dict(message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", **quiet)
                encoder = peft.PeftModel.from_pretrained(model.encoder, str(directory), is_trainable=True)
        except Exception as err:  # safetensors' and json's own error types for a broken file
            raise CheckpointError(
                f"{directory}: cannot load the LoRA adapter ({type(err).__name__}: {err}); the "
                "directory is damaged, or the adapter is for another base encoder."
            ) from err
        model.encoder = encoder
        fields = {k: v for k, v in record.items() if k in ("r", "alpha", "dropout", "targets")}
        return LoRA(**fields)._finish(model)


def base_checksum(encoder: nn.Module, skip: list[list[int]] | None = None) -> str:
    """SHA-256 of an encoder's base weights (adapters left out), to tell a wrong base apart;
    input-embedding rows in the `skip` ranges ([start, end)) or past them are left out too."""
    digest = hashlib.sha256()
    embedding = encoder.get_input_embeddings().weight
    named = {
        name.replace(".base_layer", ""): p for name, p in encoder.named_parameters() if "lora_" not in name
    }
    for name in sorted(named):
        weight = named[name]
        if weight is embedding and skip:
            keep = torch.ones(len(weight), dtype=torch.bool)
            for start, end in skip:
                keep[start:end] = False
            weight = weight[keep[: len(weight)]]
        digest.update(name.encode())
        digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def new_row_ranges(encoder: nn.Module) -> list[list[int]]:
    """The input-embedding rows `extend_vocabulary` added, as [start, end) ranges."""
    new = getattr(encoder.get_input_embeddings(), "llmtune_new_rows", None)
    if new is None or not new.any():
        return []
    ids = torch.nonzero(new).flatten().tolist()
    ranges = [[ids[0], ids[0] + 1]]
    for i in ids[1:]:
        if i == ranges[-1][1]:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def merge_adapters(model: ClassifierModel) -> ClassifierModel:
    """Fold LoRA adapters into the encoder weights (peft's `merge_and_unload`); all parameters train again."""
    if not has_adapters(model):
        raise ConfigError("the model has no LoRA adapters to merge; apply one with model.tune(LoRA(...))")
    model.encoder = model.encoder.merge_and_unload()
    for param in model.parameters():  # a plain model again, as from_pretrained returns it
        param.requires_grad_(True)
    model.tuning = None
    return model


class FeatureLoader:
    """Batches of cached pooled encoder features, in the order of the token batches they replace.

    Built by `FeatureLoader.build`, which runs the (frozen) encoder once per example in eval
    mode; each batch is `{"features": (B, hidden), "labels": (B, ...)}`, which
    `ClassifierModel.forward(features=...)` sends straight to the head.
    """

    def __init__(self, features: torch.Tensor, labels: np.ndarray, batches: BatchLoader) -> None:
        self.features = features  # (N, hidden)
        self.labels = labels
        self.batches = batches

    @classmethod
    def build(
        cls,
        model: ClassifierModel,
        loader: BatchLoader,
        device: torch.device,
        dtype: torch.dtype | None = None,
        batch_size: int = 64,
        dist: DistributedContext | None = None,
    ) -> FeatureLoader:
        """Encode every example of `loader` once (eval mode: no dropout) and keep the features.

        Under data parallelism each rank encodes every `world_size`-th example and the ranks
        exchange their rows, so every rank holds all features (its batches change each epoch).
        """
        data = loader.data
        order = np.argsort(data.lengths, kind="stable")  # similar lengths together: little padding
        split = dist is not None and dist.enabled
        if split:
            order = order[dist.rank :: dist.world_size]
        chunks, was_training = [], model.training
        model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    batch = data.collate(order[start : start + batch_size], _runtime.pad_multiple(device))
                    batch.pop("labels", None)
                    with _runtime.autocast(device, dtype):
                        chunks.append(model.encode(**_runtime.to_device(batch, device)).float())  # (b, H)
        finally:
            model.train(was_training)
        if split:
            rows = dist.gather_rows(torch.cat(chunks).cpu().numpy(), order, len(data))  # (N, H)
            return cls(torch.from_numpy(rows).to(device), data.labels, loader)
        # Put rows back in data order. Done outside inference_mode, so the result is a normal
        # tensor: inference tensors cannot be saved for the head's backward pass.
        inverse = torch.from_numpy(np.argsort(order)).to(device)
        return cls(torch.cat(chunks)[inverse], data.labels, loader)  # (N, H)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices in self.batches.batch_indices():
            yield {
                "features": self.features[torch.from_numpy(indices).to(self.features.device)],
                "labels": torch.from_numpy(self.labels[indices]),
            }
