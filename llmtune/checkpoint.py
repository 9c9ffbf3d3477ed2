"""Checkpoints: saving one, loading its weights, finding them, and the Checkpoint callback.

A checkpoint is a directory written whole or not at all (`_atomic.write_atomically`); what it
holds and how each file is read back is the checkpoint format (`_checkpoint_format`).
`FineTuner.fit(resume_from=...)` continues a run from one (`_resume.resume_run`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _atomic
from . import _checkpoint_format as fmt
from ._checkpoint_format import (  # noqa: F401 - the file names are part of this module's interface
    BEST_FILE,
    CALLBACKS_FILE,
    CONFIG_FILE,
    FILES,
    FORMAT,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    data_fingerprint,
    model_summary,
    tuner_settings,
)
from ._guard import nonfinite_weights
from ._lock import DirectoryLock
from .callbacks import Callback, _Monitor
from .errors import CheckpointError, TrainingError

if TYPE_CHECKING:
    from .trainer import FineTuner, TrainState

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_weights",
    "list_checkpoints",
    "latest_checkpoint",
    "best_checkpoint",
]

logger = logging.getLogger("llmtune")


def _check_finite(model: torch.nn.Module) -> None:
    bad = nonfinite_weights(model)
    if not bad:
        return
    raise TrainingError(
        f"refusing to write a checkpoint: model weights {bad[:5]} hold NaN or inf. "
        "Lower the learning rate or check the data; the previous checkpoint is intact."
    )


def save_checkpoint(
    path: str | os.PathLike,
    tuner: FineTuner,
    state: TrainState,
    *,
    epoch_done: bool = False,
    data: dict[str, Any] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
    epoch_loss_sum: float | None = None,
) -> Path:
    """Write the run's complete state to directory `path`, atomically.

    Args:
        path: the checkpoint directory (replaced if it exists).
        tuner: the FineTuner whose model and callbacks are saved.
        state: the run state, holding the optimizer, scheduler and grad scaler.
        epoch_done: True at an epoch's end (its record is in the history): a resumed run
            starts the next epoch. False after an optimizer step inside an epoch.
        data: `data_fingerprint(train)`, checked when the run resumes.
        rng_ranks: every data-parallel rank's RNG states (`Checkpoint` gathers them).
        epoch_loss_sum: the epoch's loss sum over all data-parallel ranks (`Checkpoint` sums
            their shares); None: `state.epoch_loss`, this process's.

    Returns:
        The checkpoint directory.

    Raises:
        TrainingError: a weight is NaN or inf (the checkpoint would be poisoned).
    """
    _check_finite(tuner.model)
    return _atomic.write_atomically(
        path, lambda tmp: fmt.write_files(tmp, tuner, state, epoch_done, data, rng_ranks, epoch_loss_sum)
    )


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights into `model` (safetensors only), e.g. to start a new run.

    Raises:
        CheckpointError: the checkpoint is incomplete, damaged, in a newer format, or belongs
            to a different model or label set (the message lists what differs).
    """
    path = fmt.complete(Path(path))
    config = fmt.read_config(path / CONFIG_FILE)
    weights = fmt.read_weights(path / MODEL_FILE)
    fmt.check_model(path, config, weights, model)
    model.load_state_dict(weights, strict=False)


# -- finding checkpoints -------------------------------------------------------------------


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints (`step-N` directories with every file) in `directory`, oldest first."""
    return fmt.checkpoints_in(Path(directory))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def best_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `Checkpoint(monitor=...)` marked best in `directory`, or None."""
    marker = Path(directory) / BEST_FILE
    if not marker.is_file():
        return None
    path = Path(directory) / fmt.read_json(marker)["checkpoint"]
    return path if path in list_checkpoints(directory) else None


# -- the callback --------------------------------------------------------------------------


class Checkpoint(Callback):
    """Write resumable checkpoints to `directory/step-N`, keeping the last few (and the best).

    A checkpoint holds everything a run needs to continue bit for bit: model (safetensors),
    optimizer, LR schedule, grad scaler, RNG states, the position inside the epoch, counters,
    history, callback state and the run's configuration. Resume with
    `tuner.fit(train, val, resume_from="latest")`. A save that falls on an epoch's last
    step is written at the end of that epoch, after validation, so it includes the epoch.

    The directory is the run's: from the start of `fit` (or of a resume's reading) to its
    end, however it ends, a lock file (`directory/.lock`, naming the pid) makes another run
    on it fail with a `CheckpointError` before it changes anything. Under torch.distributed
    only rank 0 locks and writes.

    Args:
        directory: where the `step-N` directories go; it belongs to this run (old
            checkpoints beyond `keep_last` are deleted).
        every_n_steps: save after every n-th optimizer step (None: not by steps).
        every_epoch: save at the end of each epoch (after validation).
        keep_last: how many of the newest checkpoints to keep (None: all).
        monitor: validation metric whose best checkpoint is always kept and recorded in
            `directory/best.json` ("auto": the objective's; None: no best tracking).
        mode: "min", "max" or "auto" (from the metric's name).

    Example:
        >>> tuner = FineTuner(model, callbacks=[Checkpoint("ckpt", every_n_steps=500)])  # doctest: +SKIP
        >>> tuner.fit(train, val, resume_from="latest")  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every_n_steps: int | None = None,
        every_epoch: bool = True,
        keep_last: int | None = 2,
        monitor: str | None = None,
        mode: str = "auto",
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if every_n_steps is None and not every_epoch and monitor is None:
            raise ValueError("nothing to save: set every_n_steps, every_epoch or monitor")
        self.directory = Path(directory)
        self.every_n_steps, self.every_epoch, self.keep_last = every_n_steps, every_epoch, keep_last
        self.best = _Monitor(monitor, mode) if monitor is not None else None
        self.best_path: Path | None = None
        self.last_path: Path | None = None
        self._data: dict[str, Any] | None = None
        self._pending = self._improved = False
        self._lock = DirectoryLock(self.directory)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": None if self.best is None else self.best.best,
            "best_path": None if self.best_path is None else self.best_path.name,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.best is not None:
            self.best.best = state["best"]
        self.best_path = None if state["best_path"] is None else self.directory / state["best_path"]
        # A run killed between a best checkpoint and its marker left best.json naming an older
        # one; the checkpoint's own state says which is best.
        if self.best is not None and self.best_path is not None and _is_main():
            marker = self.directory / BEST_FILE
            if not marker.is_file() or fmt.read_json(marker).get("checkpoint") != self.best_path.name:
                self._write_marker(self.best_path)

    def lock(self, tuner: FineTuner) -> None:
        """Make `directory` this run's until `on_fit_end` or `on_exception` (rank 0 only).

        Raises:
            CheckpointError: another live process holds it (the message names its pid).
        """
        if self._lock.held or not tuner.is_main:  # every rank holds the same state; rank 0 writes
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        # Left by a run killed while saving or pruning; with the lock held no live run owns them.
        for stale in [*self.directory.glob(f"{_atomic.TMP}*"), *self.directory.glob(f"{_atomic.TRASH}*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        """kwargs: `train`, the training data, whose fingerprint each checkpoint records."""
        self.lock(tuner)
        ahead = [p for p in list_checkpoints(self.directory) if int(p.name.split("-")[1]) > state.step]
        if ahead:
            # They would outrank this run's own checkpoints for resume_from="latest" and pruning.
            self._lock.release()
            raise CheckpointError(
                f"{self.directory} already holds checkpoints ahead of this run (up to {ahead[-1].name}; "
                f"this run is at step {state.step}). resume_from='latest' continues the newest; to start "
                "over or branch from an older one, use another directory or delete them."
            )
        if self.best is not None:
            self.best.on_fit_start(tuner, state)
        train = kwargs.get("train")
        self._data = data_fingerprint(train) if train is not None else None
        self._pending = self._improved = False

    def on_fit_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        self._lock.release()

    def on_exception(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        self._lock.release()

    def on_step_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.every_n_steps is None or state.step % self.every_n_steps:
            return
        epoch_ends = state.batches_done >= state.batches_per_epoch
        if epoch_ends or state.step >= state.total_steps or state.should_stop:
            self._pending = True  # written at on_epoch_end, with the epoch's record
        else:
            self.save(tuner, state, epoch_done=False)

    def on_evaluate(
        self, tuner: FineTuner, state: TrainState, *, metrics: dict[str, float], **kwargs: Any
    ) -> None:
        if state.epoch < 0:  # the probed head's evaluation: no checkpoint holds that state
            return
        self._improved = self.best is not None and self.best.improved(metrics)

    def on_epoch_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.every_epoch or self._pending or self._improved:
            self.save(tuner, state, epoch_done=True)
        self._pending = self._improved = False

    def save(self, tuner: FineTuner, state: TrainState, *, epoch_done: bool) -> Path | None:
        """Write `step-N` now, mark it best if it is, and delete checkpoints beyond `keep_last`."""
        # Every rank's RNG (a collective: every rank calls save at the same steps), then one writes.
        rng_ranks = tuner.dist.gather_objects(fmt.rng_state()) if tuner.dist.enabled else None
        # Each rank holds its share of the epoch's loss sum; the checkpoint keeps the whole sum.
        loss_sum = float(tuner.dist.sum(torch.as_tensor(state.epoch_loss)))
        if not tuner.is_main:  # every rank holds the same weights; one writes
            return None
        path = self.directory / f"step-{state.step:08d}"
        previous_best = self.best_path
        improved = self._improved and epoch_done  # only a save right after an evaluation is scored
        if improved:
            self.best_path = path  # before saving, so the saved state names itself best
        try:
            save_checkpoint(
                path,
                tuner,
                state,
                epoch_done=epoch_done,
                data=self._data,
                rng_ranks=rng_ranks,
                epoch_loss_sum=loss_sum,
            )
        except BaseException:
            self.best_path = previous_best
            raise
        self.last_path = path
        if improved:
            self._write_marker(path)
        self._prune()
        return path

    def _write_marker(self, path: Path) -> None:
        assert self.best is not None
        marker = {"checkpoint": path.name, "monitor": self.best.monitor, "value": self.best.best}
        _atomic.write_file_atomically(self.directory / BEST_FILE, json.dumps(marker))

    def _prune(self) -> None:
        found = list_checkpoints(self.directory)
        keep = set(found if self.keep_last is None else found[-self.keep_last :])
        for path in found:
            if path not in keep and path != self.best_path:
                _atomic.remove(path)


def _is_main() -> bool:
    """Rank 0, or not distributed: the process that writes (`tuner.is_main`, where no tuner is at hand)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
