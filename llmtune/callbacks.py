"""Callbacks: small objects that react to the loop's named events.

Events, in order: on_fit_start, then per epoch on_epoch_start, on_step_end (after each
optimizer step), on_evaluate (after validation), on_epoch_end; finally on_fit_end. Each is
called as `event(tuner, state, **kwargs)` (on_evaluate with `metrics` and the validation
`outputs=(logits, targets)`, one row per text); a callback reads `state` and may set
`state.should_stop`. Override only the events you need and accept `**kwargs`. When fit
raises, `on_exception(tuner, state, error=...)` comes instead of on_fit_end, so that a
callback can release what it holds (the Checkpoint callback's directory lock).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from . import metrics as M

if TYPE_CHECKING:
    from .trainer import FineTuner, TrainState

__all__ = ["Callback", "ProgressBar", "EarlyStopping", "KeepBest", "HistoryLogger", "EVENTS"]

logger = logging.getLogger("llmtune")

EVENTS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_evaluate", "on_epoch_end", "on_fit_end")


class Callback:
    """Base class with every event as a no-op."""

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None: ...

    def on_epoch_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None: ...

    def on_step_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        """kwargs: `loss` (detached tensor, mean over the step's examples), `examples`, `tokens`."""

    def on_evaluate(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        """kwargs: `metrics`, the validation results (also `state.metrics`); `outputs`, (logits, targets)."""

    def on_epoch_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None: ...

    def on_fit_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None: ...

    def on_exception(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        """fit raised (kwargs: `error`), perhaps before on_fit_start; release what you hold."""

    def state_dict(self) -> dict[str, Any]:
        """What a `Checkpoint` saves of this callback (tensors and plain values); default none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, when a run resumes (after `on_fit_start`)."""


_Fit = TypeVar("_Fit", bound=Callable[..., Any])


def notify_on_exception(fit: _Fit) -> _Fit:
    """Wrap `FineTuner.fit` so that when it raises, every callback's `on_exception` runs first."""

    @functools.wraps(fit)
    def wrapper(tuner: FineTuner, *args: Any, **kwargs: Any) -> Any:
        try:
            return fit(tuner, *args, **kwargs)
        except BaseException as error:
            for callback in tuner.callbacks:
                handler = getattr(callback, "on_exception", None)  # duck-typed callbacks may lack it
                try:
                    if handler is not None:
                        handler(tuner, tuner.state, error=error)
                except Exception:  # the run's own error is the one to see
                    logger.exception("%s.on_exception failed", type(callback).__name__)
            raise

    return wrapper  # type: ignore[return-value]


def _resolve_monitor(tuner: FineTuner, monitor: str, mode: str) -> tuple[str, str]:
    if monitor == "auto":
        monitor, auto_mode = tuner.objective.monitor, tuner.objective.mode
    else:
        auto_mode = "min" if M.lower_is_better(monitor) else "max"
    return monitor, auto_mode if mode == "auto" else mode


class _Monitor(Callback):
    """Tracks the best value of one validation metric."""

    def __init__(self, monitor: str = "auto", mode: str = "auto", min_delta: float = 0.0) -> None:
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self._asked = (monitor, mode)  # "auto" resolves again for each fit's objective
        self.best: float | None = None

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        self.monitor, self.mode = _resolve_monitor(tuner, *self._asked)
        self.best = None
        names = ("loss", *getattr(tuner, "metrics", ()))
        if self.monitor not in names:  # before any step, not after the first epoch's evaluation
            raise self._unknown(names)

    def better(self, metrics: dict[str, float]) -> bool:
        """Whether `metrics` beat the best so far (which stays as it is)."""
        if self.monitor not in metrics:
            raise self._unknown(metrics)
        value = metrics[self.monitor]
        if math.isnan(value):
            return False
        return self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )

    def _unknown(self, names: Collection[str]) -> KeyError:
        bare = self.monitor.removeprefix("val_")
        hint = (
            f" (the names carry no 'val_' prefix: {bare!r})" if bare != self.monitor and bare in names else ""
        )
        return KeyError(
            f"monitored metric {self.monitor!r} is not among the validation metrics {sorted(names)}{hint}"
        )

    def improved(self, metrics: dict[str, float]) -> bool:
        """`better`, and if so, `metrics` become the best so far."""
        if not self.better(metrics):
            return False
        self.best = metrics[self.monitor]
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


class EarlyStopping(_Monitor):
    """Stop when the monitored validation metric has not improved for `patience` evaluations.

    Example:
        >>> FineTuner(model, callbacks=[EarlyStopping("f1", patience=2)])  # doctest: +SKIP
    """

    def __init__(self, monitor: str = "auto", patience: int = 2, mode: str = "auto", min_delta: float = 0.0):
        super().__init__(monitor, mode, min_delta)
        self.patience = patience
        self.bad_epochs = 0

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        super().on_fit_start(tuner, state)
        self.bad_epochs = 0

    def on_evaluate(
        self, tuner: FineTuner, state: TrainState, *, metrics: dict[str, float], **kwargs: Any
    ) -> None:
        if self.improved(metrics):  # an improvement never stops the run, whatever the patience
            self.bad_epochs = 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            logger.info("early stopping: %s did not improve for %d evaluations", self.monitor, self.patience)
            state.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bad_epochs = state["bad_epochs"]


class KeepBest(_Monitor):
    """Keep a CPU copy of the trainable weights at the best validation score; restore it at the end.

    With `confidence` > 0, a state that scores better than the kept one replaces it only when
    it also beats the first state evaluated (the probed head, or epoch 1) on at least that
    share of `resamples` paired bootstrap resamples of the validation examples: on a few
    dozen examples the plain best of many evaluations is mostly the luckiest. Compared with
    the first state, not the kept one, so that steady small gains add up. Off by default:
    at 0.95 it gained 0.3 point over ten draws of 24 validation tweets and lost 1.4 on 192;
    docs/quality.md has the figures.
    """

    def __init__(
        self, monitor: str = "auto", mode: str = "auto", confidence: float = 0.0, resamples: int = 200
    ) -> None:
        if not 0.0 <= confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {confidence}")
        super().__init__(monitor, mode)
        self.confidence, self.resamples = confidence, resamples
        self.weights: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] | None = None  # all validation metrics of the kept state
        self.reference: tuple[Any, Any] | None = None  # the first state's validation (logits, targets)

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        super().on_fit_start(tuner, state)
        # A new fit (a resumed one gets them back after this) must not end on the last one's weights.
        self.reference, self.weights, self.best_epoch, self.best_metrics = None, None, None, None

    def on_evaluate(
        self,
        tuner: FineTuner,
        state: TrainState,
        *,
        metrics: dict[str, float],
        outputs: tuple[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.better(metrics):
            return
        if self.confidence and outputs is not None:
            if self.reference is None:  # the first state: nothing to beat yet
                self.reference = outputs
            elif not self._convincing(tuner, state, outputs, metrics[self.monitor]):
                return
        self.best, self.best_epoch, self.best_metrics = metrics[self.monitor], state.epoch, dict(metrics)
        # Frozen parameters never change, so only the trainable ones need a copy.
        self.weights = {
            name: p.detach().to("cpu", copy=True)
            for name, p in tuner.model.named_parameters()
            if p.requires_grad
        }

    def _convincing(
        self, tuner: FineTuner, state: TrainState, outputs: tuple[Any, Any], value: float
    ) -> bool:
        """Whether `outputs` beat the first state's on `confidence` of the paired resamples."""
        (new, targets), (first, _) = outputs, self.reference
        sign = 1.0 if self.mode == "max" else -1.0
        rng = np.random.default_rng(state.step)  # every data-parallel rank draws the same rows
        wins = 0
        for _ in range(self.resamples):
            rows = rng.integers(0, len(targets), len(targets))
            gain = tuner.score(self.monitor, new[rows], targets[rows]) - tuner.score(
                self.monitor, first[rows], targets[rows]
            )
            wins += sign * gain > 0
        if wins >= self.confidence * self.resamples:
            return True
        logger.info(
            "%s improved to %.4f at epoch %d, but beat the first state on %d of %d resamples only: "
            "the kept state stays",
            self.monitor,
            value,
            state.epoch + 1,
            wins,
            self.resamples,
        )
        return False

    def state_dict(self) -> dict[str, Any]:
        # As tensors: checkpoints are read back with torch.load(weights_only=True).
        reference = None if self.reference is None else [torch.from_numpy(a) for a in self.reference]
        return {
            **super().state_dict(),
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "weights": self.weights,
            "reference": reference,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best_epoch, self.weights = state["best_epoch"], state["weights"]
        self.best_metrics = state.get("best_metrics")  # checkpoints before it had none
        reference = state.get("reference")  # absent from checkpoints written before it was kept
        self.reference = None if reference is None else tuple(t.numpy() for t in reference)

    def on_fit_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.weights is None or self.best_epoch == state.epoch:
            return
        params = dict(tuner.model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)
        which = "the probed head's (epoch 0)" if self.best_epoch < 0 else f"epoch {self.best_epoch + 1}'s"
        logger.info("restored %s weights (%s=%.4f)", which, self.monitor, self.best)


class ProgressBar(Callback):
    """A tqdm bar per epoch with loss and throughput, and one summary line per epoch.

    The loss is read from the device (a host sync) only every `refresh` steps.
    """

    def __init__(self, refresh: int = 10) -> None:
        self.refresh = refresh
        self.bar: Any = None

    def on_epoch_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if not tuner.is_main:  # one bar per run, not one per data-parallel rank
            return
        from tqdm.auto import tqdm

        done = state.step - state.epoch * state.steps_per_epoch  # > 0 when resumed inside the epoch
        title = f"epoch {state.epoch + 1}"
        self.bar = tqdm(total=state.steps_per_epoch, initial=done, desc=title, unit="step", leave=False)
        self.examples, self.start = 0, time.perf_counter()

    def on_step_end(
        self, tuner: FineTuner, state: TrainState, *, loss: torch.Tensor, examples: int, **kwargs: Any
    ) -> None:
        if self.bar is None:
            return
        self.examples += examples
        self.bar.update(1)
        if state.step % self.refresh == 0:
            rate = self.examples / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.1f}", refresh=False)

    def on_epoch_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.bar is None:
            return
        self.bar.close()
        self.bar = None
        from tqdm.auto import tqdm

        record = state.history.records[-1]
        shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        tqdm.write(shown)

    def on_fit_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class HistoryLogger(Callback):
    """Append each epoch's record (train loss, validation metrics) to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if not tuner.is_main:  # data-parallel ranks hold the same history; rank 0 writes it
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run rewrites the records it already has, so the file matches the history.
        self.path.write_text("".join(json.dumps(r) + "\n" for r in state.history.records))

    def on_epoch_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if not tuner.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(state.history.records[-1]) + "\n")
