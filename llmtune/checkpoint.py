"""Checkpoints: what one holds, saving and safe loading, and the Checkpoint callback.

A checkpoint is a directory written whole or not at all (`_atomic.write_atomically`).
`FineTuner.fit(resume_from=...)` continues a run from one (`_resume.resume_run`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _atomic
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

FORMAT = 1
MODEL_FILE = "model.safetensors"  # every tensor of model.state_dict()
OPTIMIZER_FILE = "optimizer.pt"  # torch.save'd state dicts, read back with weights_only=True
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"  # python, numpy, torch (and CUDA) generator states
CALLBACKS_FILE = "callbacks.pt"  # KeepBest's best weights, EarlyStopping's patience, ...
STATE_FILE = "trainer_state.json"  # counters, position in the epoch, history
CONFIG_FILE = "config.json"  # model summary, labels, data fingerprint, FineTuner settings
FILES = (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    SCALER_FILE,
    RNG_FILE,
    CALLBACKS_FILE,
    STATE_FILE,
    CONFIG_FILE,
)
BEST_FILE = "best.json"
_NAME = re.compile(r"^step-(\d+)$")
# Settings that fix the data order: with others the stored position means nothing.
_ORDER_SETTINGS = ("batch_size", "grad_accum", "seed", "group_by_length")


def _write_json(path: Path, obj: Any) -> None:
    # repr-exact floats: a float survives the JSON round trip bit for bit.
    path.write_text(json.dumps(obj, indent=1, default=repr))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read ({err}); the checkpoint is damaged.") from None


def _torch_load(path: Path, device: torch.device | str) -> Any:
    # weights_only: tensors and plain containers only; a crafted file cannot run code.
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # unpickling fails in many ways; all mean a damaged or foreign file
        raise CheckpointError(f"{path}: cannot read ({type(err).__name__}: {err}).") from None


# -- what a checkpoint records -------------------------------------------------------------


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """What makes a checkpoint fit a model: class, task, labels, head width, encoder shape."""
    config = getattr(getattr(model, "encoder", None), "config", None)
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    head = getattr(model, "head", None)
    return {
        "class": type(model).__name__,
        "task": getattr(model, "task", None),
        "labels": getattr(model, "labels", None),
        "num_outputs": getattr(head, "out_features", None),
        "pooling": getattr(model, "pooling", None),
        "max_length": getattr(model, "max_length", None),
        "encoder": {k: getattr(config, k, None) for k in keys} if config is not None else None,
    }


def tuner_settings(tuner: FineTuner) -> dict[str, Any]:
    """The FineTuner's settings, as JSON values."""
    factory = tuner.optimizer
    settings = {
        "epochs": tuner.epochs,
        "max_steps": tuner.max_steps,
        # Examples per step over all data-parallel ranks: B on 2 ranks continues as 2B on one.
        "batch_size": tuner.batch_size * tuner.dist.world_size,
        "grad_accum": tuner.grad_accum,
        "max_grad_norm": tuner.max_grad_norm,
        "precision": str(tuner.dtype),
        "seed": tuner.seed,
        "group_by_length": tuner.group_by_length,
        "nonfinite": getattr(tuner, "nonfinite", "raise"),
        "objective": repr(tuner.objective),
        "optimizer": asdict(factory) if is_dataclass(factory) else repr(factory),
    }
    return json.loads(json.dumps(settings, default=repr))  # tuples -> lists, as read back


def data_fingerprint(data: Any) -> dict[str, Any]:
    """Size and content hash of a DatasetAdapter's columns (texts and mapped labels)."""
    dataset = getattr(data, "dataset", None)
    if dataset is None:
        return {"examples": len(data)}
    digest = hashlib.sha256()
    for column in dataset.column_names:
        digest.update(column.encode())
        digest.update(json.dumps(list(dataset[column])).encode())
    return {"examples": len(data), "sha256": digest.hexdigest()[:16]}


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif "cuda" in state:
        logger.warning("the checkpoint has CUDA RNG states but CUDA is not available; dropout will differ")


def _state_record(state: TrainState, epoch_done: bool) -> dict[str, Any]:
    # At an epoch's end the run continues at the start of the next epoch.
    return {
        "step": state.step,
        "epoch": state.epoch + 1 if epoch_done else state.epoch,
        "batches_done": 0 if epoch_done else state.batches_done,
        "epoch_loss_sum": 0.0 if epoch_done else float(state.epoch_loss),
        "epoch_examples": 0 if epoch_done else state.epoch_examples,
        "epoch_skipped": 0 if epoch_done else state.epoch_skipped,
        "examples_seen": state.examples_seen,
        "skipped": state.skipped,
        "should_stop": state.should_stop,
        "total_steps": state.total_steps,
        "batches_per_epoch": state.batches_per_epoch,
        "metrics": state.metrics,
        "history": state.history.records,
    }


def _check_finite(model: torch.nn.Module) -> None:
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    if not tensors or torch.stack([torch.isfinite(v).all() for v in tensors.values()]).all():  # one host sync
        return
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
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
) -> Path:
    """Write the run's complete state to directory `path`, atomically.

    Args:
        path: the checkpoint directory (replaced if it exists).
        tuner: the FineTuner whose model and callbacks are saved.
        state: the run state, holding the optimizer, scheduler and grad scaler.
        epoch_done: True at an epoch's end (its record is in the history): a resumed run
            starts the next epoch. False after an optimizer step inside an epoch.
        data: `data_fingerprint(train)`, checked when the run resumes.

    Returns:
        The checkpoint directory.

    Raises:
        TrainingError: a weight is NaN or inf (the checkpoint would be poisoned).
    """
    from safetensors.torch import save_model

    model = tuner.model
    _check_finite(model)

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / MODEL_FILE), metadata={"llmtune_format": str(FORMAT)})
        torch.save(state.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(state.scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(state.scaler.state_dict(), tmp / SCALER_FILE)
        torch.save(_rng_state(), tmp / RNG_FILE)
        callbacks = [{"class": type(c).__name__, "state": c.state_dict()} for c in tuner.callbacks]
        torch.save(callbacks, tmp / CALLBACKS_FILE)
        _write_json(tmp / STATE_FILE, _state_record(state, epoch_done))
        config = {
            "format": FORMAT,
            "model": model_summary(model),
            "data": data,
            "settings": tuner_settings(tuner),
        }
        _write_json(tmp / CONFIG_FILE, config)

    return _atomic.write_atomically(path, write)


# -- finding checkpoints -------------------------------------------------------------------


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints (`step-N` directories with every file) in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and all((path / f).is_file() for f in FILES):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def best_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `Checkpoint(monitor=...)` marked best in `directory`, or None."""
    marker = Path(directory) / BEST_FILE
    if not marker.is_file():
        return None
    path = Path(directory) / _read_json(marker)["checkpoint"]
    return path if path in list_checkpoints(directory) else None


# -- loading -----------------------------------------------------------------------------


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if saved == current:
        return []
    return [f"{prefix.rstrip('.')}: {saved!r} in the checkpoint, {current!r} now"]


def _complete(path: Path) -> Path:
    missing = [f for f in FILES if not (path / f).is_file()]
    if not missing:
        return path
    hint = ""
    if list_checkpoints(path):
        hint = f" It holds checkpoints: pass one of them, e.g. {latest_checkpoint(path)}, or 'latest'."
    raise CheckpointError(f"{path} is not a complete checkpoint (missing {missing}).{hint}")


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights into `model` (safetensors only), e.g. to start a new run.

    Raises:
        CheckpointError: the checkpoint is incomplete, or belongs to a different model or
            label set (the message lists what differs).
    """
    from safetensors.torch import load_model

    path = _complete(Path(path))
    _check_model(path, model)
    missing, _ = load_model(model, str(path / MODEL_FILE), strict=False, device=str(_model_device(model)))
    if missing:
        raise CheckpointError(f"{path} lacks weights of this model: {sorted(missing)[:5]}")


def _check_model(path: Path, model: torch.nn.Module) -> None:
    from safetensors import safe_open

    saved = _read_json(path / CONFIG_FILE)["model"]
    differences = _differences(saved, model_summary(model))
    current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path / MODEL_FILE), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    differences += [f"weight {k} is not in this model" for k in sorted(set(stored) - set(current))][:5]
    differences += [
        f"weight {k}: shape {stored[k]} in the checkpoint, {current[k]} now"
        for k in sorted(set(stored) & set(current))
        if stored[k] != current[k]
    ][:5]
    if differences:
        raise CheckpointError(
            f"{path} was written for a different model: " + "; ".join(differences) + ". "
            "Build the model the checkpoint was trained with (same encoder, labels, task, tuning)."
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- the callback --------------------------------------------------------------------------


class Checkpoint(Callback):
    """Write resumable checkpoints to `directory/step-N`, keeping the last few (and the best).

    A checkpoint holds everything a run needs to continue bit for bit: model (safetensors),
    optimizer, LR schedule, grad scaler, RNG states, the position inside the epoch, counters,
    history, callback state and the run's configuration. Resume with
    `tuner.fit(train, val, resume_from="latest")`. A save that falls on an epoch's last
    step is written at the end of that epoch, after validation, so it includes the epoch.

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": None if self.best is None else self.best.best,
            "best_path": None if self.best_path is None else self.best_path.name,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.best is not None:
            self.best.best = state["best"]
        self.best_path = None if state["best_path"] is None else self.directory / state["best_path"]

    def on_fit_start(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        """kwargs: `train`, the training data, whose fingerprint each checkpoint records."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in [*self.directory.glob(f"{_atomic.TMP}*"), *self.directory.glob(f"{_atomic.TRASH}*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving or pruning
        ahead = [p for p in list_checkpoints(self.directory) if int(p.name.split("-")[1]) > state.step]
        if ahead:
            # They would outrank this run's own checkpoints for resume_from="latest" and pruning.
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
        self._improved = self.best is not None and self.best.improved(metrics)

    def on_epoch_end(self, tuner: FineTuner, state: TrainState, **kwargs: Any) -> None:
        if self.every_epoch or self._pending or self._improved:
            self.save(tuner, state, epoch_done=True)
        self._pending = self._improved = False

    def save(self, tuner: FineTuner, state: TrainState, *, epoch_done: bool) -> Path | None:
        """Write `step-N` now, mark it best if it is, and delete checkpoints beyond `keep_last`."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:  # every rank holds the same weights; one writes
                return None
        path = self.directory / f"step-{state.step:08d}"
        previous_best = self.best_path
        if self._improved:
            self.best_path = path  # before saving, so the saved state names itself best
        try:
            save_checkpoint(path, tuner, state, epoch_done=epoch_done, data=self._data)
        except BaseException:
            self.best_path = previous_best
            raise
        self.last_path = path
        if self._improved:
            assert self.best is not None
            marker = {"checkpoint": path.name, "monitor": self.best.monitor, "value": self.best.best}
            _atomic.write_file_atomically(self.directory / BEST_FILE, json.dumps(marker))
        self._prune()
        return path

    def _prune(self) -> None:
        found = list_checkpoints(self.directory)
        keep = set(found if self.keep_last is None else found[-self.keep_last :])
        for path in found:
            if path not in keep and path != self.best_path:
                _atomic.remove(path)
