"""The base of the experiment loggers: what to log when, on which rank, and how a resumed run continues."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from .._card import training_setup
from ..callbacks import Callback

if TYPE_CHECKING:
    import torch

    from ..trainer import FineTuner, TrainState

__all__ = ["ExperimentLogger"]

TRACKING_MISSING = "{what} needs the {package} package, an optional extra: pip install llmtune[tracking]"


def require(package: str, what: str) -> None:
    """Fail at construction, not at the first logged step, when a tracker's library is missing."""
    if importlib.util.find_spec(package) is None:
        raise ImportError(TRACKING_MISSING.format(what=what, package=package))


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`train/lr` (the encoder's largest, as scheduled) and `train/head_lr` (the head's own group;
    a grown vocabulary's new rows share it, as new weights)."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        names = group.get("param_names") or ()
        params = group["params"]
        new = [n.startswith("head.") or getattr(p, "llmtune_grown", False) for n, p in zip(names, params)]
        key = "train/head_lr" if new and all(new) else "train/lr"
        rates[key] = max(rates.get(key, 0.0), float(group["lr"]))
    return rates


class ExperimentLogger(Callback):
    """Base class: hyperparameters once, metrics by step, one run per fit, only on rank 0.

    What it logs: the run's settings (`FineTuner` settings, optimizer, tuning strategy,
    model, data sizes) when the run starts; `train/loss` and `train/lr` (`train/head_lr`)
    every `log_every` optimizer steps, reading the loss from the device only then; at
    each epoch's end `train/epoch_loss` and the validation metrics as `val/<name>`, at the
    epoch's last step. Metric names are the same for every tracker.

    A tracker is a subclass with a few small methods: `start(state, resumed)` opens a new
    run, or reopens the one its `load_state_dict` restored (then `resuming()` is True);
    `log_hyperparameters(params)`; `log_metrics(metrics, step)`; `finish(failed)`; and
    `forget()`, which drops the previous fit's run so that the next fit starts a new one.
    The run opens at the first thing logged, after a resumed fit has restored the
    callback's state, so a fit resumed from a `Checkpoint` continues the same tracker run.

    Args:
        log_every: log the training loss and learning rate every this many optimizer steps.
    """

    def __init__(self, log_every: int = 10) -> None:
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
        self.log_every = log_every
        self.active: bool | None = None  # this process logs the current fit (rank 0); None before any
        self.opened = False
        self.params: dict[str, Any] = {}
        self.metric_names: list[str] = []

    # -- what a tracker implements ----------------------------------------------------------

    def start(self, state: TrainState, resumed: bool) -> None:
        raise NotImplementedError

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, failed: bool) -> None:
        raise NotImplementedError

    def forget(self) -> None:
        """Drop the previous fit's run (the state `state_dict` returns)."""

    def resuming(self) -> bool:
        """True when `load_state_dict` named a run to continue."""
        return False

    # -- events -----------------------------------------------------------------------------

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        """kwargs: `train`, `validation` (their sizes are logged)."""
        if self.opened:  # a previous fit that raised past on_exception
            self.finish(failed=True)
        self.active, self.opened = tuner.is_main, False
        self.forget()
        if self.active:
            self.params = training_setup(tuner, kwargs.get("train"), kwargs.get("validation"))
            self.metric_names = [f"val/{name}" for name in ("loss", *tuner.metrics)]

    def open(self, state: TrainState) -> None:
        """Start or reopen the run on the first thing logged; a new run logs its hyperparameters."""
        if self.opened:
            return
        resumed = self.resuming()
        self.start(state, resumed)
        self.opened = True
        if not resumed:
            self.log_hyperparameters(self.params)

    def on_epoch_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.active:
            self.open(state)

    def on_step_end(self, tuner: FineTuner, state: TrainState, *, loss: torch.Tensor, **kwargs: Any) -> None:
        if not self.active or state.step % self.log_every:
            return
        self.open(state)
        self.log_metrics({"train/loss": float(loss), **learning_rates(state.optimizer)}, state.step)

    def on_epoch_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if not self.active:
            return
        self.open(state)
        record = state.history.records[-1]
        metrics = {"train/epoch_loss": record["train_loss"], "epoch": record["epoch"]}
        metrics |= {f"val/{k[4:]}": v for k, v in record.items() if k.startswith("val_")}
        self.log_metrics({k: float(v) for k, v in metrics.items()}, state.step)

    def on_fit_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if not self.active:
            return
        self.open(state)  # a fit with nothing to train still records its settings
        self.finish(failed=False)
        self.opened = False

    def on_exception(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.opened:
            self.finish(failed=True)
            self.opened = False
