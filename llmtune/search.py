"""Hyperparameter search with Optuna: `search(build, train, validation)`, a small default space,
and the feature cache that lets head-only trials share one encoding pass.

Optuna is imported when a search runs (`pip install llmtune[search]`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import metrics as M
from .callbacks import Callback, KeepBest
from .errors import ConfigError, TrainingError
from .objectives import Objective
from .optim import OptimizerFactory
from .trainer import FineTuner
from .tuning import BitFit, Full, HeadOnly, LoRA, TopLayers, TuningStrategy, encoder_frozen

if TYPE_CHECKING:
    import optuna

    from .data import DatasetAdapter
    from .trainer import TrainState

__all__ = ["search", "SearchResult", "default_space", "Settings", "FeatureCache"]

logger = logging.getLogger("llmtune")

OPTUNA_MISSING = "llmtune.search needs the optuna package, an optional extra: pip install llmtune[search]"


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError(OPTUNA_MISSING) from None
    return optuna


# -- the feature cache ---------------------------------------------------------------------


def _weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor in `module`'s state dict (names, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """The pooled features of frozen encoders, by encoder weights and input tokens.

    While attached to a model whose encoder is frozen (`HeadOnly`), its `encode` looks each
    text up by its tokens before running the encoder, and keeps what it computes. Models
    with the same encoder weights, pooling and class share entries, so the trials of a
    head-only search (each loading its own copy of the encoder) encode the training and
    validation texts once between them: `FineTuner`'s feature cache and every validation
    pass after the first are lookups. Dropout is off while the encoder runs in eval mode,
    as it does in both, so a feature depends on the tokens alone; in train mode, or under
    a different autocast dtype, nothing is shared.

    Example:
        >>> cache = FeatureCache()
        >>> with cache.attach(model):  # doctest: +SKIP
        ...     FineTuner(model).fit(train, val)
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, ...], dict[bytes, torch.Tensor]] = {}
        self.hits = self.misses = 0  # texts found / encoded

    def clear(self) -> None:
        self.entries.clear()

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Serve `model.encode` from the cache inside the block (a no-op if the encoder trains)."""
        if not encoder_frozen(model):
            yield model
            return
        device = model.head.weight.device
        key = (type(model), getattr(model, "pooling", None), str(device), _weights_digest(model.encoder))
        encode = model.encode
        offset = not getattr(model, "decoder", False)  # an encoder's positions count from the first token

        def cached(
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            # Dropout makes features random; other inputs are not in the key; an encoder that
            # trains again since `attach` would be served stale features.
            if model.training or kwargs or not encoder_frozen(model):
                return encode(input_ids, attention_mask, token_type_ids, **kwargs)
            autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
            rows = self.entries.setdefault((*key, autocast), {})
            keys = _row_keys(input_ids, attention_mask, token_type_ids, offset)
            if all(k in rows for k in keys):
                self.hits += len(keys)
                return torch.stack([rows[k] for k in keys])  # (B, H)
            self.misses += len(keys)
            features = encode(input_ids, attention_mask, token_type_ids)  # (B, H)
            for k, row in zip(keys, features.detach()):
                rows[k] = row.clone()
            return features

        before = model.__dict__.get("encode")
        model.encode = cached  # an instance attribute: the class's encode is untouched
        try:
            yield model
        finally:
            if before is None:
                del model.encode
            else:
                model.encode = before


def _row_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None, offset: bool
) -> list[bytes]:
    """One key per row: its real tokens (and token types, and where they start for an encoder)."""
    ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy().astype(bool)  # (B, T)
    types = None if token_type_ids is None else token_type_ids.cpu().numpy()
    keys = []
    for i in range(len(ids)):
        key = ids[i][mask[i]].tobytes()
        if types is not None:
            key += b"|" + types[i][mask[i]].tobytes()
        if offset:
            key += b"@" + int(mask[i].argmax()).to_bytes(4, "little")
        keys.append(key)
    return keys


# -- the default space ---------------------------------------------------------------------

# Encoder learning rates worth trying, by strategy: the fewer weights train, the larger.
LR_RANGES = {"Full": (1e-5, 1e-4), "TopLayers": (1e-5, 3e-4), "BitFit": (1e-4, 1e-2), "LoRA": (1e-4, 2e-3)}


@dataclass(frozen=True)
class Settings:
    """One trial's choices: a tuning strategy and the optimizer and loop settings; `tuner` applies them."""

    strategy: TuningStrategy = field(default_factory=Full)
    lr: float = 5e-5
    head_lr: float | str | None = "auto"
    weight_decay: float = 0.01
    warmup: float = 0.0
    epochs: int = 3
    batch_size: int = 32

    def tuner(self, model: torch.nn.Module, **kwargs: Any) -> FineTuner:
        """Tune `model` with the strategy and return a FineTuner with these settings (kwargs: the others)."""
        model.tune(self.strategy)
        optimizer = OptimizerFactory.adamw(
            lr=self.lr, weight_decay=self.weight_decay, head_lr=self.head_lr, warmup=self.warmup
        )
        return FineTuner(model, optimizer=optimizer, epochs=self.epochs, batch_size=self.batch_size, **kwargs)


def default_space(
    trial: optuna.Trial,
    *,
    strategies: Sequence[str] = ("Full", "HeadOnly", "TopLayers", "LoRA"),
    epochs: tuple[int, int] = (1, 4),
    batch_sizes: Sequence[int] = (16, 32),
    top_layers: tuple[int, int] = (1, 3),
    lora_ranks: Sequence[int] = (4, 8, 16),
    lora_targets: Sequence[str | None] = (None,),
) -> Settings:
    """Suggest a small, common space: strategy, encoder and head LR, weight decay, warmup, epochs, batch size.

    Parameters (Optuna names): `strategy` among `strategies` ("Full", "HeadOnly",
    "TopLayers", "BitFit", "LoRA"); `lr`, log-uniform in a range that suits the strategy
    (`LR_RANGES`; not for HeadOnly, whose encoder is frozen); `head_lr` in [1e-4, 1e-2],
    log-uniform; `weight_decay` in [0, 0.1]; `warmup` in [0, 0.2] of the steps; `epochs`
    in the `epochs` range; `batch_size` among `batch_sizes`. TopLayers adds `top_layers`
    (k, in `top_layers`), LoRA adds `lora_r` (among `lora_ranks`), `lora_alpha` (r or 2r)
    and, when given several, `lora_targets` (comma-separated module names; None: the
    family's query and value projections). A choice of one value is not suggested.

    Example:
        >>> def build(trial):  # doctest: +SKIP
        ...     model = ClassifierModel.from_pretrained(path, labels=train.labels)
        ...     return default_space(trial, strategies=("HeadOnly", "LoRA")).tuner(model, progress=False)
    """

    def choose(name: str, choices: Sequence[Any]) -> Any:
        return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))

    name = choose("strategy", strategies)
    if name == "TopLayers":
        strategy: TuningStrategy = TopLayers(trial.suggest_int("top_layers", *top_layers))
    elif name == "LoRA":
        r = choose("lora_r", lora_ranks)
        targets = choose("lora_targets", lora_targets)
        alpha = r * choose("lora_alpha_ratio", (1, 2))
        strategy = LoRA(r=r, alpha=alpha, targets=None if targets is None else tuple(targets.split(",")))
    else:
        kinds = {"Full": Full, "HeadOnly": HeadOnly, "BitFit": BitFit}
        if name not in kinds:
            raise ConfigError(
                f"unknown strategy {name!r}; choose from Full, HeadOnly, TopLayers, BitFit, LoRA"
            )
        strategy = kinds[name]()
    lr = 5e-5 if name == "HeadOnly" else trial.suggest_float("lr", *LR_RANGES[name], log=True)
    return Settings(
        strategy=strategy,
        lr=lr,
        head_lr=trial.suggest_float("head_lr", 1e-4, 1e-2, log=True),
        weight_decay=trial.suggest_float("weight_decay", 0.0, 0.1),
        warmup=trial.suggest_float("warmup", 0.0, 0.2),
        epochs=trial.suggest_int("epochs", *epochs),
        batch_size=choose("batch_size", batch_sizes),
    )


# -- the search ----------------------------------------------------------------------------


class _Pruning(Callback):
    """Report each epoch's validation metric to the trial; stop the fit when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric, self.pruned = trial, metric, False

    def on_evaluate(
        self, tuner: FineTuner, state: TrainState, *, metrics: dict[str, float], **kwargs: Any
    ) -> None:
        # Step 0 is the probed head's evaluation ("epoch 0", state.epoch -1), step k epoch k.
        self.trial.report(metrics[self.metric], state.epoch + 1)
        if self.trial.should_prune():
            self.pruned = state.should_stop = (
                True  # fit ends as usual; the search then marks the trial pruned
            )


@dataclass
class SearchResult:
    """What `search` found: the study, the best trial's parameters and value, and its tuner."""

    study: optuna.Study
    best_params: dict[str, Any]
    best_value: float
    metric: str
    direction: str
    best_tuner: FineTuner | None = None  # the best trial's tuner and trained model (keep_best=True)


def _resolve(metric: str, direction: str, train: DatasetAdapter) -> tuple[str, str]:
    if metric == "auto":  # the default objective's monitor for the data's task
        objective = Objective.for_task(train.task or "classification")
        metric, mode = objective.monitor, objective.mode
    else:
        mode = "min" if M.lower_is_better(metric) else "max"
    if direction == "auto":
        direction = {"min": "minimize", "max": "maximize"}[mode]
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"direction must be 'auto', 'minimize' or 'maximize', got {direction!r}")
    return metric, direction


def search(
    build: Callable[[optuna.Trial], FineTuner],
    train: DatasetAdapter,
    validation: DatasetAdapter,
    *,
    n_trials: int | None = 20,
    metric: str = "auto",
    direction: str = "auto",
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    study: optuna.Study | None = None,
    timeout: float | None = None,
    keep_best: bool = True,
    feature_cache: FeatureCache | None = None,
) -> SearchResult:
    """Run `build(trial).fit(train, validation)` for each Optuna trial and keep the best.

    `build` makes a FineTuner (and its model) from a trial, as transformers' `model_init`
    and `hp_space` do together, without subclassing anything; `default_space` suggests a
    common space. Each epoch's validation `metric` is reported to the trial, and a fit the
    pruner stops ends at that epoch's end (callbacks see a normal `on_fit_end`). A trial's
    value is the metric of the weights its fit ends with: the state `KeepBest` keeps (a
    `KeepBest` left on "auto" ranks by `metric`), else the last epoch's. Head-only trials share one
    `FeatureCache`, so the frozen encoder runs over the data once for the whole search. A
    trial whose loss turns NaN (`TrainingError`) is marked failed and the search goes on.

    Args:
        build: trial -> FineTuner.
        train, validation: the data every trial trains and is scored on.
        n_trials: how many trials (None: until `timeout`).
        metric: validation metric to optimise ("auto": the default objective's monitor for
            the data's task, e.g. "f1" for classification, "loss" for regression).
        direction: "maximize", "minimize" or "auto" (from the metric).
        sampler, pruner: Optuna's (default: TPE and the median pruner); ignored with `study`.
        study: an existing study to continue (its direction must match; "auto" takes it).
        timeout: stop starting trials after this many seconds.
        keep_best: keep the best trial's FineTuner (and trained model) in the result.
        feature_cache: share features with other searches; default: a new cache.

    Returns:
        A `SearchResult`: the study, best parameters, best value and the best trial's tuner.

    Raises:
        ImportError: optuna is not installed (`pip install llmtune[search]`).
        ConfigError: the metric is not one the tuners report, or directions disagree.
        TrainingError: no trial completed (all pruned or failed).

    Example:
        >>> from llmtune.search import default_space, search
        >>> def build(trial):  # doctest: +SKIP
        ...     model = ClassifierModel.from_pretrained(path, labels=train.labels)
        ...     return default_space(trial).tuner(model, progress=False)
        >>> result = search(build, train, val, n_trials=20)  # doctest: +SKIP
        >>> result.best_params, result.best_value  # doctest: +SKIP
    """
    optuna = _import_optuna()
    if study is not None and direction == "auto":
        direction = study.direction.name.lower()
    metric, direction = _resolve(metric, direction, train)
    if study is None:
        study = optuna.create_study(direction=direction, sampler=sampler, pruner=pruner)
    elif study.direction.name.lower() != direction:
        raise ConfigError(
            f"the study is to {study.direction.name.lower()} but direction={direction!r} was asked "
            f"(metric {metric!r}); pass the study's direction, or another study."
        )
    cache = feature_cache if feature_cache is not None else FeatureCache()
    best: dict[str, Any] = {"value": None, "tuner": None, "trial": None}
    better = (lambda a, b: a > b) if direction == "maximize" else (lambda a, b: a < b)

    def objective(trial: optuna.Trial) -> float:
        tuner = build(trial)
        reported = ("loss", *tuner.metrics)
        if metric not in reported:
            raise ConfigError(f"metric {metric!r} is not among the validation metrics {list(reported)}")
        keep = [c for c in tuner.callbacks if isinstance(c, KeepBest)]
        for c in keep:
            if c._asked[0] == "auto":  # keep the epoch that is best by what the search ranks
                c._asked = (metric, "max" if direction == "maximize" else "min")
        pruning = _Pruning(trial, metric)
        tuner.callbacks.append(pruning)
        with cache.attach(tuner.model):
            history = tuner.fit(train, validation)
        tuner.callbacks.remove(pruning)
        trial.set_user_attr("history", history.records)
        if pruning.pruned:
            raise optuna.TrialPruned(f"stopped after epoch {len(history)}")
        value = _kept_value(history, metric, keep)
        if math.isnan(value):
            return value  # Optuna marks the trial failed
        if keep_best and (best["value"] is None or better(value, best["value"])):
            best["value"], best["tuner"], best["trial"] = value, tuner, trial.number
        return value

    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(TrainingError,))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise TrainingError(
            f"no trial of the search completed ({len(study.trials)} pruned or failed); "
            "pass study=optuna.create_study(...) to look at each trial's state; widen the space or "
            "give the pruner more patience (MedianPruner(n_warmup_steps=...))."
        )
    logger.info("search: best %s=%.4f with %s", metric, study.best_value, study.best_params)
    tuner = best["tuner"]
    if tuner is not None and best["trial"] != study.best_trial.number:
        # A continued study's best trial ran in an earlier call: this call's best model is not it.
        logger.info("search: the study's best trial ran before this call; best_tuner is None")
        tuner = None
    return SearchResult(
        study=study,
        best_params=study.best_params,
        best_value=study.best_value,
        metric=metric,
        direction=direction,
        best_tuner=tuner,
    )


def _kept_value(history: Any, metric: str, keep: list[KeepBest]) -> float:
    """`metric` of the state the fit ended with: the one KeepBest kept (maybe the probe), else the last."""
    if keep and keep[0].weights is not None and keep[0].best_metrics:
        value = keep[0].best_metrics.get(metric)
    else:
        values = history[f"val_{metric}"]
        value = values[-1] if values else None
    return math.nan if value is None else float(value)
