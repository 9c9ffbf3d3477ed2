"""FineTuner: the training loop (train, evaluate, keep the best, stop early) and its run state.

Scope: one model, one objective, one optimizer factory. What a step computes belongs to
`Objective`; which parameters train to the model and `OptimizerFactory`; everything
else that reacts to the loop (progress, early stopping, history files) is a `Callback`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _cpu_fast, _guard, _resume, _runtime, distributed
from ._batching import BatchLoader
from .callbacks import EVENTS, Callback, KeepBest, ProgressBar, notify_on_exception
from .data import DatasetAdapter
from .errors import ConfigError, DataError
from .objectives import Objective
from .optim import OptimizerFactory
from .tuning import FeatureLoader, encoder_frozen

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
    """Everything about a run in progress that callbacks may read (and `should_stop` write).

    The `epoch_*` and `batches_done` fields are the position inside the current epoch; with
    the optimizer, scheduler and scaler they are what a checkpoint needs to resume exactly.
    """

    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    batches_per_epoch: int = 0  # micro-batches
    batches_done: int = 0  # micro-batches of this epoch consumed so far
    examples_seen: int = 0
    epoch_loss: torch.Tensor | float = 0.0  # sum of loss * examples this epoch, on the device
    epoch_examples: int = 0
    epoch_skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: History = field(default_factory=History)
    should_stop: bool = False
    optimizer: Any = field(default=None, repr=False)
    scheduler: Any = field(default=None, repr=False)
    scaler: Any = field(default=None, repr=False)

    def next_epoch(self) -> None:
        """Reset the per-epoch position and sums."""
        self.batches_done, self.epoch_examples, self.epoch_skipped = 0, 0, 0
        self.epoch_loss = torch.zeros_like(torch.as_tensor(self.epoch_loss))


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
        nonfinite: what a NaN or infinite loss or gradient norm does: "raise" stops with a
            `TrainingError` naming the step and batch, before the weights change; "skip"
            drops that optimizer step (counted as `skipped_steps` in each epoch's record).
        fast_cpu: on a CPU, train with cheaper dropout masks, one GEMM for each attention
            layer's query/key/value and a sparse word-embedding backward (same maths, ~1.3x
            the speed; see benchmarks/README.md). The masks come from a different random
            stream than torch's dropout; False uses torch's own kernels.

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
        nonfinite: str = "raise",
        fast_cpu: bool = True,
    ) -> None:
        if epochs < 1 and max_steps is None:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        if batch_size < grad_accum or batch_size % grad_accum:
            raise ConfigError(f"batch_size={batch_size} must be a multiple of grad_accum={grad_accum}")
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
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
        self.nonfinite = nonfinite
        self.fast_cpu = fast_cpu
        self.callbacks = list(callbacks)
        if progress and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            self.callbacks.insert(0, ProgressBar())
        if keep_best and not any(isinstance(c, KeepBest) for c in self.callbacks):
            self.callbacks.append(KeepBest())
        self.state = TrainState()
        self.dist = distributed.DistributedContext()

    @property
    def is_main(self) -> bool:
        """False on every data-parallel rank but 0; those print and write nothing."""
        return self.dist.is_main

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

    @notify_on_exception  # callbacks release what they hold (a checkpoint directory's lock)
    def fit(
        self,
        train: DatasetAdapter,
        validation: DatasetAdapter | None = None,
        *,
        resume_from: str | os.PathLike | None = None,
    ) -> History:
        """Train on `train`, evaluating on `validation` after each epoch; returns the History.

        Args:
            train: the training data.
            validation: evaluated after each epoch; its metrics go to the history and callbacks.
            resume_from: a checkpoint directory, or "latest": the newest complete checkpoint
                of the `Checkpoint` callback (a fresh start while there is none). The run
                continues exactly where the checkpoint was written.

        Raises:
            CheckpointError: the checkpoint is damaged, or from another model, label set or data.
            TrainingError: a non-finite loss or gradient norm (with `nonfinite="raise"`).
        """
        self.check_data(train, validation)
        # Under torchrun: join the process group; batch_size is then per rank (as in DDP).
        self.dist, self.device = distributed.setup(self.device)
        model = self.model.to(self.device)
        _runtime.seed_everything(self.seed)
        loader = train.loader(
            model.tokenizer,
            batch_size=self.batch_size // self.grad_accum,
            max_length=model.max_length,
            shuffle=True,
            group_by_length=self.group_by_length,
            seed=self.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        loader = self.cache_features(loader)
        steps_per_epoch = math.ceil(len(loader) / self.grad_accum)
        total_steps = self.max_steps or self.epochs * steps_per_epoch
        epochs = math.ceil(total_steps / steps_per_epoch)
        optimizer, scheduler = self.optimizer.build(model, total_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        params = [p for p in model.parameters() if p.requires_grad]
        state = self.state = TrainState(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batches_per_epoch=len(loader),
            epoch_loss=torch.zeros((), device=self.device),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
        )
        # Weights, optimizer, schedule, counters and history come back before on_fit_start (a
        # HistoryLogger writes the history there); callback state and RNG after it (it resets them).
        resumed = _resume.resume_run(self, resume_from, train) if resume_from is not None else None
        self.emit("on_fit_start", state, train=train, validation=validation)
        if resumed is not None:
            resumed.restore_callbacks_and_rng(self)
        net = self.dist.wrap(model, self.device)
        # Same maths, cheaper CPU kernels (see _cpu_fast); the sparse embedding gradient is
        # single-process only, as DDP's reducer wants dense gradients.
        fast = None
        if self.fast_cpu and self.device.type == "cpu":
            fast = _cpu_fast.FastPaths(model, sparse_embedding=self.dist.world_size == 1)
        with fast or contextlib.nullcontext():
            for epoch in range(state.epoch, epochs):
                if state.step >= total_steps or state.should_stop:
                    break
                state.epoch = epoch
                loader.set_epoch(epoch)
                model.train()
                self.emit("on_epoch_start", state)
                self._train_epoch(net, loader, params, fast)

                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "step": state.step,
                    "train_loss": (self.dist.sum(state.epoch_loss) / state.epoch_examples).item(),
                }
                if self.nonfinite == "skip":
                    record["skipped_steps"] = state.epoch_skipped
                if validation is not None:
                    state.metrics = self.evaluate(validation)
                    record.update({f"val_{k}": v for k, v in state.metrics.items()})
                    self.emit("on_evaluate", state, metrics=state.metrics)
                state.history.records.append(record)
                logger.info("epoch %d: %s", epoch + 1, record)
                self.emit("on_epoch_end", state)
                state.next_epoch()
        self.emit("on_fit_end", state)
        return state.history

    def _train_epoch(
        self,
        net: torch.nn.Module,
        loader: BatchLoader | FeatureLoader,
        params: list,
        fast: _cpu_fast.FastPaths | None,
    ) -> None:
        """One epoch's optimizer steps (or fewer, at max_steps or should_stop)."""
        state, world = self.state, self.dist.world_size
        optimizer, scheduler, scaler = state.optimizer, state.scheduler, state.scaler
        # A resumed run continues inside its epoch: the batch order is fixed by (seed, epoch).
        for window in _windows(itertools.islice(loader, state.batches_done, None), self.grad_accum):
            n = self.dist.total(sum(len(batch["labels"]) for batch in window))  # all ranks
            step_loss, losses = torch.zeros((), device=self.device), []
            for i, batch in enumerate(window):
                batch = _runtime.to_device(batch, self.device)
                with self.dist.no_sync(net, sync=i == len(window) - 1):
                    with _runtime.autocast(self.device, self.dtype):
                        logits = net(**batch)
                    # Each example weighs 1/n, so the step's gradient is that of one batch of all
                    # n examples; DDP averages over ranks, hence the factor `world`.
                    loss = self.objective(logits, batch["labels"]) * (len(batch["labels"]) * world / n)
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
                losses.append(loss.detach())
            # With the fast paths the word-embedding gradient is still sparse here: its
            # ~1,000 touched rows stand in for the whole vocabulary in the norm and clipping.
            grads = _guard.gradients(params, fast.sparse_rows() if fast is not None else None)
            grad_norm = _guard.grad_norm(grads, optimizer, scaler)
            state.batches_done += len(window)
            if not _guard.check_finite(self, state, losses, grad_norm, scaler, len(window)):
                optimizer.zero_grad(set_to_none=True)
                scaler.update()  # an fp16 scaler also lowers its scale here
                continue
            # Below the threshold clipping multiplies every gradient by 1.0: skip that pass
            # (2.5 ms of a 150 ms MiniLM CPU step). The guard has just synced: the read is free.
            if self.max_grad_norm is not None and float(grad_norm) + 1e-6 > self.max_grad_norm:
                _guard.clip(grads, self.max_grad_norm, grad_norm)
            if fast is not None:
                fast.densify()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.examples_seen += n
            state.epoch_loss += step_loss * n / world  # this rank's share of the loss sum
            state.epoch_examples += n
            tokens = sum(int(b["attention_mask"].sum()) for b in window if "attention_mask" in b)
            self.emit("on_step_end", state, loss=step_loss, examples=n, tokens=tokens)
            if state.step >= state.total_steps or state.should_stop:
                break

    def cache_features(self, loader: BatchLoader) -> BatchLoader | FeatureLoader:
        """On a frozen encoder (e.g. `HeadOnly`), run it once per example and train on its features.

        Returns a `FeatureLoader` that yields the same batches as `loader`, with cached pooled
        features in place of tokens, so every epoch costs only the head; otherwise `loader`.
        Override and return `loader` to always run the encoder.
        """
        if not encoder_frozen(self.model):
            return loader
        return FeatureLoader.build(
            self.model, loader, self.device, self.dtype, self.eval_batch_size, dist=self.dist
        )

    # -- evaluation and prediction -------------------------------------------------------

    def predict(self, data: DatasetAdapter) -> np.ndarray:
        """Raw model outputs (logits) for every example, in data order, shape (N, num_labels)."""
        model = self.model.to(self.device)
        tokenized = data.tokenize(model.tokenizer, model.max_length)
        # Data-parallel ranks each run a share of the examples and exchange the outputs.
        mine = np.arange(len(tokenized))[self.dist.rank :: self.dist.world_size]
        with _runtime.autocast(self.device, self.dtype):
            rows = model.outputs(tokenized, self.eval_batch_size, indices=mine)
        return self.dist.gather_rows(rows, mine, len(tokenized))

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
