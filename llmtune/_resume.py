"""Resuming a FineTuner run from a checkpoint: refuse what does not fit, restore the rest exactly.

All or nothing: every file is read and checked before the model, optimizer or anything else
is touched, so a damaged or refused checkpoint leaves the run as it was.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _checkpoint_format as fmt
from ._checkpoint_format import (
    CALLBACKS_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    ORDER_SETTINGS,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
)
from .checkpoint import Checkpoint, latest_checkpoint
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
        """Put the callbacks' state and every RNG back; the last thing before the loop.

        A saved state goes to the callback of the same class and occurrence (the second
        KeepBest gets the second saved KeepBest's), wherever the callbacks now stand.
        """
        pairs, homeless, starved = match_callbacks(self.callbacks, tuner.callbacks)
        for label, callback, state in pairs:
            try:
                callback.load_state_dict(state)
            except Exception as err:
                raise CheckpointError(
                    f"{self.path / CALLBACKS_FILE}: {label} cannot take its saved state "
                    f"({type(err).__name__}: {err}); was the callback configured differently?"
                ) from None
        if pairs:
            logger.info("restored the state of callbacks %s", [label for label, _, _ in pairs])
        if homeless:
            logger.warning("resuming from %s: saved state of %s has no callback now", self.path, homeless)
        if starved:
            logger.warning("resuming from %s: %s got no saved state; they start fresh", self.path, starved)
        # Each rank continues its own stream where the run had as many ranks; else rank 0's.
        ranks = self.rng.get("ranks")
        same = ranks is not None and len(ranks) == tuner.dist.world_size
        fmt.set_rng_state(ranks[tuner.dist.rank] if same else self.rng)


def match_callbacks(
    saved: list[dict[str, Any]], callbacks: list[Any]
) -> tuple[list[tuple[str, Any, dict[str, Any]]], list[str], list[str]]:
    """Pair saved callback states with callbacks by class name and occurrence.

    Returns (label, callback, state) pairs, the labels of saved states without a callback
    now, and of callbacks with state of their own that got none ("KeepBest #2" is the
    second KeepBest). Empty states (a ProgressBar's) are neither.
    """
    by_class: dict[str, list[dict[str, Any]]] = {}
    for entry in saved:
        by_class.setdefault(entry["class"], []).append(entry["state"])
    seen: Counter[str] = Counter()
    pairs, starved = [], []
    for callback in callbacks:
        name = type(callback).__name__
        index = seen[name]
        seen[name] += 1
        label = f"{name} #{index + 1}"
        states = by_class.get(name, [])
        if index < len(states):
            pairs.append((label, callback, states[index]))
        elif getattr(callback, "state_dict", dict)():
            starved.append(label)
    homeless = [
        f"{name} #{i + 1}"
        for name, states in by_class.items()
        for i in range(seen[name], len(states))
        if states[i]
    ]
    return pairs, homeless, starved


def resolve(tuner: FineTuner, resume_from: str | os.PathLike) -> Path | None:
    """The checkpoint `resume_from` names, locked for this run; None for "latest" with none yet."""
    owners = [c for c in tuner.callbacks if isinstance(c, Checkpoint)]
    for owner in owners:  # before reading: no other run may write or prune there meanwhile
        owner.lock(tuner)
    if str(resume_from) != "latest":
        return fmt.complete(Path(resume_from))
    if not owners:
        raise CheckpointError(
            "resume_from='latest' looks in the Checkpoint callback's directory, but the FineTuner "
            "has no Checkpoint callback; add one or pass a checkpoint directory."
        )
    path = latest_checkpoint(owners[0].directory)
    if path is None:
        logger.warning("no checkpoint in %s yet: starting from scratch", owners[0].directory)
    return path


@dataclass
class _Checked:
    """A checkpoint read in full and checked against the run, before anything is restored."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    record: dict[str, Any]
    callbacks: list[dict[str, Any]]
    rng: dict[str, Any]


def resume_run(tuner: FineTuner, path: Path, train: Any) -> Resumed:
    """Load model, optimizer, scheduler, scaler, counters and history into `tuner.state`.

    `path` is the checkpoint `resolve` found.

    Raises:
        CheckpointError: damaged, incomplete or newer-format checkpoint, or one from a
            different model, label set, training data or data order (batch size, seed, ...).
            Nothing has been restored then.
    """
    checked = _read(path, tuner, train)
    state = tuner.state
    tuner.model.load_state_dict(checked.weights, strict=False)
    state.optimizer.load_state_dict(checked.optimizer)
    state.scheduler.load_state_dict(checked.scheduler)
    if checked.scaler:  # empty when saved by a disabled scaler (fp32, bf16)
        state.scaler.load_state_dict(checked.scaler)
    record = checked.record
    for key in ("step", "epoch", "batches_done", "examples_seen", "skipped", "should_stop", "metrics"):
        setattr(state, key, record[key])
    state.epoch_examples, state.epoch_skipped = record["epoch_examples"], record["epoch_skipped"]
    # The saved sum is over all ranks; each rank holds its share, which the epoch's record sums.
    loss = record["epoch_loss_sum"] / tuner.dist.world_size
    state.epoch_loss = torch.tensor(loss, dtype=torch.float32, device=tuner.device)
    state.history.records = record["history"]
    logger.info(
        "resuming from %s: step %d, epoch %d, batch %d", path, state.step, state.epoch + 1, state.batches_done
    )
    return Resumed(path, checked.callbacks, checked.rng)


def _read(path: Path, tuner: FineTuner, train: Any) -> _Checked:
    config = fmt.read_config(path / CONFIG_FILE)
    weights = fmt.read_weights(path / MODEL_FILE)
    fmt.check_model(path, config, weights, tuner.model)
    saved_data, data = config.get("data"), fmt.data_fingerprint(train)
    if saved_data is not None and saved_data != data:
        raise CheckpointError(
            f"{path} was written for different training data ({saved_data['examples']} examples, "
            f"hash {saved_data.get('sha256')}; now {data['examples']}, {data.get('sha256')}). "
            "Resume with the same data, or start a new run from its weights with load_weights()."
        )
    now = fmt.run_summary(tuner)
    settings = now["settings"]
    order = [d for k in ORDER_SETTINGS for d in fmt.differences(config["settings"].get(k), settings[k], k)]
    if order:
        raise CheckpointError(
            f"{path}: {'; '.join(order)}. These fix the data order, so the run cannot continue "
            "where it stopped; use the checkpoint's settings or start a new run with load_weights()."
        )
    record = fmt.read_state(path / STATE_FILE)
    if record["batches_per_epoch"] != tuner.state.batches_per_epoch:
        raise CheckpointError(
            f"{path}: {record['batches_per_epoch']} batches per epoch in the checkpoint, "
            f"{tuner.state.batches_per_epoch} now; resume with the same data and batch size."
        )
    # Summaries a checkpoint written by an older llmtune lacks are not compared.
    changed = [d for key in now if key in config for d in _changes(config[key], now[key], key)]
    if changed:
        logger.warning("resuming from %s with changed settings: %s", path, "; ".join(changed))
    optimizer = _optimizer_state(path, config, tuner)
    return _Checked(
        weights=weights,
        optimizer=optimizer,
        scheduler=_scheduler_state(path, optimizer["param_groups"]),
        scaler=fmt.read_scaler(path / SCALER_FILE),
        record=record,
        callbacks=fmt.read_callbacks(path / CALLBACKS_FILE),
        rng=fmt.read_rng(path / RNG_FILE),
    )


def _changes(saved: Any, current: Any, key: str) -> list[str]:
    if key == "settings":  # a setting this llmtune added since the checkpoint was written is no change
        current = {k: v for k, v in current.items() if k in saved}
        return fmt.differences(saved, current)
    return fmt.differences(saved, current, f"{key}.")


# -- the optimizer and schedule --------------------------------------------------------------

_NOT_HYPERPARAMETERS = ("params", "param_names", "lr", "initial_lr")


def _optimizer_state(path: Path, config: dict[str, Any], tuner: FineTuner) -> dict[str, Any]:
    """The saved optimizer state, rearranged for this run's optimizer.

    Per-parameter state (moments, momentum) is matched by parameter name, so another grouping
    (a head LR equal to the encoder's, no weight decay) still fits; hyperparameters come from
    this run's factory; the learning rates stand at the saved point of the schedule, scaled
    when the base learning rate changed. Another optimizer class starts with fresh state.
    """
    file = path / OPTIMIZER_FILE
    saved = fmt.read_optimizer(file)
    optimizer = tuner.state.optimizer
    current = optimizer.state_dict()  # groups hold indices into this optimizer's parameters
    groups, saved_groups = current["param_groups"], saved["param_groups"]
    to_current = _pair_parameters(path, saved_groups, groups)
    saved_group_of = {i: group for group in saved_groups for i in group["params"]}
    from_saved = {j: i for i, j in to_current.items()}
    for group in groups:
        group["lr"] = _lr_at_saved_step(group, saved_group_of[from_saved[group["params"][0]]])
    was = config.get("optimizer_class")  # older checkpoints lack it: their groups' hyperparameters tell
    other = was != type(optimizer).__name__ if was else _kind(saved_groups[0]) != _kind(groups[0])
    if other:
        logger.warning(
            "resuming from %s with another optimizer (%s in the checkpoint, %s now): its state "
            "(moments, momentum buffers) starts fresh",
            path,
            was or "another",
            type(optimizer).__name__,
        )
        return {"state": {}, "param_groups": groups}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    with fmt.reading(file):
        for i, values in saved["state"].items():
            if i not in to_current:
                continue
            param = params[to_current[i]]
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"state {key!r} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                    )
            state[to_current[i]] = values
    return {"state": state, "param_groups": groups}


def _pair_parameters(path: Path, saved_groups: list[dict], groups: list[dict]) -> dict[int, int]:
    """Saved parameter index -> this optimizer's index: by name, or by position without names."""
    named = all("param_names" in g for g in saved_groups) and all("param_names" in g for g in groups)
    if not named:  # written by an older llmtune or a factory without names: the grouping must match
        was, now = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in groups]
        if was != now:
            raise CheckpointError(
                f"{path}: the optimizer state does not fit (groups of {was} parameters, now {now}); "
                "were other parameters trainable?"
            )
        saved = [i for g in saved_groups for i in g["params"]]
        return dict(zip(saved, [j for g in groups for j in g["params"]]))
    saved_index = {n: i for g in saved_groups for n, i in zip(g["param_names"], g["params"])}
    index = {n: j for g in groups for n, j in zip(g["param_names"], g["params"])}
    if saved_index.keys() != index.keys():
        raise CheckpointError(
            f"{path}: the optimizer state does not fit: {sorted(saved_index.keys() - index.keys())[:5]} "
            f"trained then but not now, {sorted(index.keys() - saved_index.keys())[:5]} train now but "
            "did not then. Were other parameters trainable? Apply the checkpoint's tuning strategy."
        )
    return {saved_index[n]: index[n] for n in index}


def _kind(group: dict[str, Any]) -> frozenset[str]:
    """The hyperparameter names of a group, which tell SGD from Adam(W), whose states differ."""
    return frozenset(k for k in group if k not in _NOT_HYPERPARAMETERS)


def _lr_at_saved_step(group: dict[str, Any], saved: dict[str, Any]) -> float:
    base, saved_base = group.get("initial_lr"), saved.get("initial_lr")
    if base is None or saved_base is None or base == saved_base:
        return saved["lr"]  # the same schedule: the exact saved value
    return base * (saved["lr"] / saved_base)  # a new base learning rate, same point of the schedule


def _scheduler_state(path: Path, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The saved schedule position (step count), with this run's base learning rates."""
    saved = fmt.read_scheduler(path / SCHEDULER_FILE)
    out = {
        **saved,
        "base_lrs": [g.get("initial_lr", g["lr"]) for g in groups],
        "_last_lr": [g["lr"] for g in groups],
    }
    if len(saved.get("lr_lambdas") or groups) != len(groups):  # another grouping; our lambdas hold no state
        out["lr_lambdas"] = [None] * len(groups)
    return out
