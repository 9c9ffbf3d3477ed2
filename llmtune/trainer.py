"""FineTuner: the training loop (train, evaluate, keep the best, stop early) and its run state.

Scope: one model, one objective, one optimizer factory. What a step computes belongs to
`Objective`; which parameters train to the model and `OptimizerFactory`; everything
else that reacts to the loop (progress, early stopping, history files) is a `Callback`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _runtime
from .callbacks import EVENTS, Callback, KeepBest, ProgressBar
from .data import DatasetAdapter
from .errors import ConfigError, DataError
from .objectives import Objective
from .optim import OptimizerFactory

__all__ = ["FineTuner", "TrainState", "History"]

logger = logging.getLogger("llmtune")


@dataclass
class History:
    """One record per epoch: epoch, step, train_loss and val_* metrics."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, key: str) -> list[Any]:
        """All epochs' values of one key, e.g. `history["val_accuracy"]`."""
        return [r.get(key) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def train_loss(self) -> list[float]:
        return self["train_loss"]

    def to_jsonl(self, path: str) -> None:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)


@dataclass
class TrainState:
    """Everything about a run in progress that callbacks may read (and `should_stop` write)."""

    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    examples_seen: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: History = field(default_factory=History)
    should_stop: bool = False


def _windows(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group micro-batches into accumulation windows of `size` (the last may be shorter)."""
    window: list[dict] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class FineTuner:
    """Trains a ClassifierModel with an Objective and an OptimizerFactory.

    Args:
        model: a `ClassifierModel` (or a module with the same `forward`, `tokenizer`,
            `labels`, `task` and `max_length`).
        objective: the loss; default: the one for the model's task.
        optimizer: default `OptimizerFactory.adamw()` (lr 5e-5, head lr 1e-3, linear decay).
        epochs: passes over the training data (ignored when `max_steps` is set).
        max_steps: stop after this many optimizer steps.
        batch_size: examples per optimizer step (split into `grad_accum` micro-batches).
        grad_accum: micro-batches per optimizer step; the loss of each is weighted by its
            share of the step's examples, so the gradient equals that of one big batch.
        max_grad_norm: clip the global gradient norm (None: no clipping).
        precision: "auto", "fp32", "bf16" or "fp16" (autocast; fp16 uses a grad scaler on CUDA).
        device: "auto" (cuda, mps, cpu) or a torch device.
        seed: seeds Python, NumPy, torch and the batch order.
        metrics: extra `fn(logits, targets) -> float` by name, added to the objective's.
        callbacks: extra callbacks; a progress bar and best-weights restore are added
            unless `progress=False` / `keep_best=False` (or one of that type is given).
        group_by_length: length-grouped training batches (less padding, faster).

    Example:
        >>> tuner = FineTuner(model, epochs=3, batch_size=32)  # doctest: +SKIP
        >>> history = tuner.fit(train, val)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective | None = None,
        optimizer: OptimizerFactory | None = None,
        *,
        epochs: int = 3,
        max_steps: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        grad_accum: int = 1,
        max_grad_norm: float | None = 1.0,
        precision: str = "auto",
        device: str | torch.device = "auto",
        seed: int = 0,
        metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        keep_best: bool = True,
        group_by_length: bool = True,
    ) -> None:
        if epochs < 1 and max_steps is None:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        if batch_size < grad_accum or batch_size % grad_accum:
            raise ConfigError(f"batch_size={batch_size} must be a multiple of grad_accum={grad_accum}")
        self.model = model
        self.objective = objective or Objective.for_task(model.task)
        if self.objective.task != model.task:
            raise ConfigError(
                f"{self.objective!r} is for {self.objective.task} but the model is {model.task}"
            )
        self.optimizer = optimizer or OptimizerFactory.adamw()
        self.epochs, self.max_steps = epochs, max_steps
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.max_grad_norm = max_grad_norm
        self.device = _runtime.resolve_device(device)
        self.dtype = _runtime.resolve_precision(precision, self.device)
        self.seed = seed
        self.metrics = {**self.objective.metrics(), **(metrics or {})}
        self.group_by_length = group_by_length
        self.callbacks = list(callbacks)
        if progress and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            self.callbacks.insert(0, ProgressBar())
        if keep_best and not any(isinstance(c, KeepBest) for c in self.callbacks):
            self.callbacks.append(KeepBest())
        self.state = TrainState()

    def emit(self, event: str, state: TrainState, **kwargs: Any) -> None:
        """Call `event` on every callback, in order."""
        assert event in EVENTS, event
        for callback in self.callbacks:
            getattr(callback, event)(self, state, **kwargs)

    # -- checks -------------------------------------------------------------------------

    def check_data(self, train: DatasetAdapter, validation: DatasetAdapter | None = None) -> None:
        """Refuse data that does not fit the model before any training starts."""
        model = self.model
        train.check_compatible(model.labels, model.task, "training")
        if validation is None:
            return
        validation.check_compatible(model.labels, model.task, "validation")
        if model.task == "classification":
            unseen = set(validation.dataset["label"]) - set(train.dataset["label"])
            if unseen:
                names = sorted(model.labels[i] for i in unseen)
                raise DataError(
                    f"labels {names} occur in validation ({validation.source}) but never in training "
                    f"({train.source}); the model cannot learn them. Use a stratified split."
                )

    # -- the loop -----------------------------------------------------------------------

    def fit(self, train: DatasetAdapter, validation: DatasetAdapter | None = None) -> History:
        """Train on `train`, evaluating on `validation` after each epoch; returns the History."""
        self.check_data(train, validation)
        model = self.model.to(self.device)
        _runtime.seed_everything(self.seed)
        loader = train.loader(
            model.tokenizer,
            batch_size=self.batch_size // self.grad_accum,
            max_length=model.max_length,
            shuffle=True,
            group_by_length=self.group_by_length,
            seed=self.seed,
        )
        steps_per_epoch = math.ceil(len(loader) / self.grad_accum)
        total_steps = self.max_steps or self.epochs * steps_per_epoch
        epochs = math.ceil(total_steps / steps_per_epoch)
        optimizer, scheduler = self.optimizer.build(model, total_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        params = [p for p in model.parameters() if p.requires_grad]
        state = self.state = TrainState(total_steps=total_steps, steps_per_epoch=steps_per_epoch)

        self.emit("on_fit_start", state)
        for epoch in range(epochs):
            state.epoch = epoch
            loader.set_epoch(epoch)
            model.train()
            self.emit("on_epoch_start", state)
            loss_sum, examples = torch.zeros((), device=self.device), 0
            for window in _windows(loader, self.grad_accum):
                n = sum(len(batch["labels"]) for batch in window)
                step_loss = torch.zeros((), device=self.device)
                for batch in window:
                    batch = _runtime.to_device(batch, self.device)
                    with _runtime.autocast(self.device, self.dtype):
                        logits = model(**batch)
                    loss = self.objective(logits, batch["labels"]) * (len(batch["labels"]) / n)
                    scaler.scale(loss).backward()
                    step_loss += loss.detach()
                if self.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.examples_seen += n
                loss_sum += step_loss * n
                examples += n
                tokens = sum(int(b["attention_mask"].sum()) for b in window)
                self.emit("on_step_end", state, loss=step_loss, examples=n, tokens=tokens)
                if state.step >= total_steps or state.should_stop:
                    break

            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": state.step,
                "train_loss": (loss_sum / examples).item(),
            }
            if validation is not None:
                state.metrics = self.evaluate(validation)
                record.update({f"val_{k}": v for k, v in state.metrics.items()})
                self.emit("on_evaluate", state, metrics=state.metrics)
            state.history.records.append(record)
            logger.info("epoch %d: %s", epoch + 1, record)
            self.emit("on_epoch_end", state)
            if state.step >= total_steps or state.should_stop:
                break
        self.emit("on_fit_end", state)
        return state.history

    # -- evaluation and prediction -------------------------------------------------------

    def predict(self, data: DatasetAdapter) -> np.ndarray:
        """Raw model outputs (logits) for every example, in data order, shape (N, num_labels)."""
        model = self.model.to(self.device)
        tokenized = data.tokenize(model.tokenizer, model.max_length)
        with _runtime.autocast(self.device, self.dtype):
            return model.outputs(tokenized, self.eval_batch_size)

    def evaluate(self, data: DatasetAdapter) -> dict[str, float]:
        """Loss and metrics over all of `data` (eval mode, no gradients)."""
        if not data.has_labels:
            raise DataError(f"evaluation data ({data.source}) has no label column.")
        logits = self.predict(data)
        targets = data.tokenize(self.model.tokenizer, self.model.max_length).labels
        loss = self.objective(torch.from_numpy(logits), torch.from_numpy(targets))
        return {
            "loss": float(loss),
            **{name: float(fn(logits, targets)) for name, fn in self.metrics.items()},
        }
