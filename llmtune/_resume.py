"""Resuming a FineTuner run from a checkpoint: refuse what does not fit, restore the rest exactly."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import (
    _ORDER_SETTINGS,
    CALLBACKS_FILE,
    CONFIG_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    Checkpoint,
    _check_model,
    _complete,
    _differences,
    _read_json,
    _set_rng_state,
    _torch_load,
    data_fingerprint,
    latest_checkpoint,
    load_weights,
    tuner_settings,
)
from .errors import CheckpointError

if TYPE_CHECKING:
    from .trainer import FineTuner

logger = logging.getLogger("llmtune")


@dataclass
class Resumed:
    """What a resumed run restores after `on_fit_start` (which resets callbacks): callbacks, RNG."""

    path: Path
    callbacks: list[dict[str, Any]]
    rng: dict[str, Any]

    def restore_callbacks_and_rng(self, tuner: FineTuner) -> None:
        """Put the callbacks' state and every RNG back; the last thing before the loop."""
        saved = [(c["class"], c["state"]) for c in self.callbacks]
        current = [type(c).__name__ for c in tuner.callbacks]
        if [name for name, _ in saved] != current:
            logger.warning(
                "the callbacks differ from the checkpoint's (%s vs %s); restoring those that match",
                [name for name, _ in saved],
                current,
            )
        for callback, (name, state) in zip(tuner.callbacks, saved):
            if type(callback).__name__ == name:
                callback.load_state_dict(state)
        _set_rng_state(self.rng)


def _resolve(tuner: FineTuner, resume_from: str | os.PathLike) -> Path | None:
    if str(resume_from) != "latest":
        return _complete(Path(resume_from))
    owners = [c for c in tuner.callbacks if isinstance(c, Checkpoint)]
    if not owners:
        raise CheckpointError(
            "resume_from='latest' looks in the Checkpoint callback's directory, but the FineTuner "
            "has no Checkpoint callback; add one or pass a checkpoint directory."
        )
    path = latest_checkpoint(owners[0].directory)
    if path is None:
        logger.warning("no checkpoint in %s yet: starting from scratch", owners[0].directory)
    return path


def resume_run(tuner: FineTuner, resume_from: str | os.PathLike, train: Any) -> Resumed | None:
    """Load model, optimizer, scheduler, scaler, counters and history into `tuner.state`.

    `resume_from` is a checkpoint directory or "latest" (the newest complete checkpoint of
    the tuner's `Checkpoint` callback; None when there is none yet: a fresh start).

    Raises:
        CheckpointError: damaged or incomplete checkpoint, or one from a different model,
            label set, training data or data order (batch size, seed, ...).
    """
    path = _resolve(tuner, resume_from)
    if path is None:
        return None
    _check_model(path, tuner.model)
    config = _read_json(path / CONFIG_FILE)
    saved_data, data = config.get("data"), data_fingerprint(train)
    if saved_data is not None and saved_data != data:
        raise CheckpointError(
            f"{path} was written for different training data ({saved_data['examples']} examples, "
            f"hash {saved_data.get('sha256')}; now {data['examples']}, {data.get('sha256')}). "
            "Resume with the same data, or start a new run from its weights with load_weights()."
        )
    settings = tuner_settings(tuner)
    order = [d for k in _ORDER_SETTINGS for d in _differences(config["settings"].get(k), settings[k], k)]
    if order:
        raise CheckpointError(
            f"{path}: {'; '.join(order)}. These fix the data order, so the run cannot continue "
            "where it stopped; use the checkpoint's settings or start a new run with load_weights()."
        )
    changed = _differences(config["settings"], settings)
    if changed:
        logger.warning("resuming from %s with changed settings: %s", path, "; ".join(changed))
    load_weights(tuner.model, path)
    state, device = tuner.state, tuner.device
    try:
        state.optimizer.load_state_dict(_torch_load(path / OPTIMIZER_FILE, device))
        state.scheduler.load_state_dict(_torch_load(path / SCHEDULER_FILE, device))
        state.scaler.load_state_dict(_torch_load(path / SCALER_FILE, device))
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit ({err}); were other parameters trainable?"
        ) from None
    record = _read_json(path / STATE_FILE)
    if record["batches_per_epoch"] != state.batches_per_epoch:
        raise CheckpointError(
            f"{path}: {record['batches_per_epoch']} batches per epoch in the checkpoint, "
            f"{state.batches_per_epoch} now; resume with the same data and batch size."
        )
    for key in ("step", "epoch", "batches_done", "examples_seen", "skipped", "should_stop", "metrics"):
        setattr(state, key, record[key])
    state.epoch_examples, state.epoch_skipped = record["epoch_examples"], record["epoch_skipped"]
    state.epoch_loss = torch.tensor(record["epoch_loss_sum"], dtype=torch.float32, device=device)
    state.history.records = record["history"]
    logger.info(
        "resuming from %s: step %d, epoch %d, batch %d", path, state.step, state.epoch + 1, state.batches_done
    )
    return Resumed(path, _torch_load(path / CALLBACKS_FILE, "cpu"), _torch_load(path / RNG_FILE, "cpu"))
