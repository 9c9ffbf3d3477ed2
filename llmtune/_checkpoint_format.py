"""The checkpoint format: the files of a `step-N` directory, how each is written and read back
(checked, naming the file when it is damaged), and the summaries of model, tokenizer, run and
data that a resume compares. `checkpoint` (saving, finding) and `_resume` (policy) build on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import CheckpointError

if TYPE_CHECKING:
    from .trainer import FineTuner, TrainState

logger = logging.getLogger("llmtune")

# Bump FORMAT when a reader of the previous format would misread the files. Additions that
# older readers ignore (a new key in config.json, MPS RNG state) keep it; readers of this
# version accept every format up to FORMAT and refuse newer ones.
FORMAT = 1
MODEL_FILE = "model.safetensors"  # every tensor of model.state_dict()
OPTIMIZER_FILE = "optimizer.pt"  # torch.save'd state dicts, read back with weights_only=True
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"  # python, numpy, torch (and CUDA, MPS) generator states
CALLBACKS_FILE = "callbacks.pt"  # KeepBest's best weights, EarlyStopping's patience, ...
STATE_FILE = "trainer_state.json"  # counters, position in the epoch, history
CONFIG_FILE = "config.json"  # format, model, tokenizer and dropout summaries, data fingerprint, settings
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
STEP_NAME = re.compile(r"^step-(\d+)$")  # a checkpoint's directory, in the Checkpoint callback's directory
# Settings that fix the data order: with others the stored position means nothing.
ORDER_SETTINGS = ("batch_size", "grad_accum", "seed", "group_by_length")
_STATE_KEYS = (  # trainer_state.json
    "step epoch batches_done epoch_loss_sum epoch_examples epoch_skipped examples_seen skipped "
    "should_stop total_steps batches_per_epoch metrics history"
).split()


# -- reading, checked ---------------------------------------------------------------------


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn any failure to read or make sense of `path` into one CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # truncated, garbage or the wrong structure: all mean a damaged file
        raise CheckpointError(
            f"{path}: cannot read ({type(err).__name__}: {err}); the checkpoint is damaged. "
            "Resume from another checkpoint (an earlier step-N) or start a new run."
        ) from None


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def read_json(path: Path) -> Any:
    with reading(path):
        return json.loads(path.read_text())


def read_torch(path: Path, kind: type = dict) -> Any:
    """A torch.save'd object of type `kind`, on the CPU."""
    with reading(path):
        # weights_only: tensors and plain containers only; a crafted file cannot run code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
        _expect(isinstance(obj, kind), f"expected a {kind.__name__}, found a {type(obj).__name__}")
    return obj


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with reading(path):
        return load_file(path)


def read_config(path: Path) -> dict[str, Any]:
    """config.json, refusing a format newer than this llmtune reads."""
    config = read_json(path)
    with reading(path):
        _expect(isinstance(config, dict) and {"model", "settings"} <= set(config), "not a checkpoint config")
        _expect(isinstance(config["model"], dict) and isinstance(config["settings"], dict), "a bad summary")
        version = config.get("format")
        _expect(isinstance(version, int) and version >= 1, f"unknown format {version!r}")
    if version > FORMAT:
        raise CheckpointError(
            f"{path.parent} is in checkpoint format {version}, written by a newer llmtune; this "
            f"version reads formats up to {FORMAT}. Upgrade llmtune (pip install -U llmtune) to use it."
        )
    return config


def read_state(path: Path) -> dict[str, Any]:
    record = read_json(path)
    with reading(path):
        missing = [k for k in _STATE_KEYS if k not in record]
        _expect(not missing, f"missing {missing}")
        counters = ("step", "epoch", "batches_done", "epoch_examples", "batches_per_epoch", "total_steps")
        _expect(all(isinstance(record[k], int) for k in counters), "a counter is not an integer")
        _expect(isinstance(record["history"], list), "the history is not a list")
    return record


def read_rng(path: Path) -> dict[str, Any]:
    state = read_torch(path)
    with reading(path):  # tried on throwaway generators, so a bad state fails here and not later
        for one in [state, *state.get("ranks", [])]:
            random.Random().setstate(_python_state(one["python"]))
            np.random.RandomState().set_state(_numpy_state(one["numpy"]))
            torch.Generator().set_state(one["torch"])
            for t in [*one.get("cuda", []), *([one["mps"]] if "mps" in one else [])]:
                is_bytes = isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                _expect(is_bytes, "a device RNG state is not bytes")
    return state


def read_callbacks(path: Path) -> list[dict[str, Any]]:
    saved = read_torch(path, list)
    with reading(path):
        _expect(
            all(
                isinstance(c, dict) and isinstance(c.get("class"), str) and isinstance(c.get("state"), dict)
                for c in saved
            ),
            "an entry is not {'class': name, 'state': dict}",
        )
    return saved


def read_optimizer(path: Path) -> dict[str, Any]:
    saved = read_torch(path)
    with reading(path):
        _expect(isinstance(saved.get("state"), dict), "no per-parameter state")
        groups = saved.get("param_groups")
        _expect(isinstance(groups, list) and bool(groups), "no parameter groups")
        _expect(all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups), "a bad group")
    return saved


def read_scaler(path: Path) -> dict[str, Any]:
    saved = read_torch(path)
    with reading(path):  # empty when written by a disabled scaler (fp32, bf16)
        _expect(not saved or {"scale", "_growth_tracker"} <= set(saved), "no scale")
    return saved


def read_scheduler(path: Path) -> dict[str, Any]:
    saved = read_torch(path)
    with reading(path):
        _expect(isinstance(saved.get("last_epoch"), int), "no step count (last_epoch)")
    return saved


def checkpoints_in(directory: Path) -> list[Path]:
    """The complete `step-N` directories in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = STEP_NAME.match(path.name)
        if match and path.is_dir() and all((path / f).is_file() for f in FILES):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def complete(path: Path) -> Path:
    """`path` if it holds every checkpoint file, else a CheckpointError saying what is missing."""
    missing = [f for f in FILES if not (path / f).is_file()]
    if not missing:
        return path
    hint = ""
    if checkpoints_in(path):
        hint = f" It holds checkpoints: pass one of them, e.g. {checkpoints_in(path)[-1]}, or 'latest'."
    raise CheckpointError(f"{path} is not a complete checkpoint (missing {missing}).{hint}")


# -- what a checkpoint records ------------------------------------------------------------


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


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Class, size and a hash of the vocabulary: another tokenizer maps texts to other ids."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {"class": type(tokenizer).__name__, "vocab_size": len(vocab), "vocab_sha256": digest}


def dropout_summary(model: torch.nn.Module) -> dict[str, Any]:
    """The head's dropout and the encoder config's dropout probabilities."""
    config = getattr(getattr(model, "encoder", None), "config", None)
    encoder = {k: v for k, v in sorted(vars(config).items()) if "dropout" in k} if config is not None else {}
    return {"head": getattr(getattr(model, "dropout", None), "p", None), "encoder": encoder}


def tuner_settings(tuner: FineTuner) -> dict[str, Any]:
    """The FineTuner's settings, as JSON values."""
    factory = tuner.optimizer
    settings = {
        "epochs": tuner.epochs,
        "max_steps": tuner.max_steps,
        "min_steps": tuner.min_steps,  # with epochs=None, what lengthens a short run
        "probe": getattr(tuner, "probe", None),  # None: only short runs are probed
        # Examples per step over all data-parallel ranks: B on 2 ranks continues as 2B on one.
        "batch_size": tuner.batch_size * tuner.dist.world_size,
        "grad_accum": tuner.grad_accum,
        "max_grad_norm": tuner.max_grad_norm,
        "precision": str(tuner.dtype),
        "seed": tuner.seed,
        "group_by_length": tuner.group_by_length,
        "nonfinite": getattr(tuner, "nonfinite", "raise"),
        "fast_cpu": getattr(tuner, "fast_cpu", None),
        "objective": repr(tuner.objective),
        "optimizer": asdict(factory) if is_dataclass(factory) else repr(factory),
    }
    return json.loads(json.dumps(settings, default=repr))  # tuples -> lists, as read back


def run_summary(tuner: FineTuner) -> dict[str, Any]:
    """What a resume may change with a warning: settings, tokenizer, dropout."""
    model = tuner.model
    return {
        "settings": tuner_settings(tuner),
        "tokenizer": tokenizer_fingerprint(model.tokenizer) if hasattr(model, "tokenizer") else None,
        "dropout": dropout_summary(model),
    }


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


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """'key: <saved> in the checkpoint, <current> now' for each leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if saved == current:
        return []
    return [f"{prefix.rstrip('.')}: {saved!r} in the checkpoint, {current!r} now"]


def check_model(
    path: Path, config: dict[str, Any], weights: dict[str, torch.Tensor], model: torch.nn.Module
) -> None:
    """Refuse weights written for another model (summary, names, shapes) before any is loaded."""
    found = differences(config["model"], model_summary(model))
    current = model.state_dict()
    found += [f"weight {k} is not in this model" for k in sorted(set(weights) - set(current))][:5]
    found += [
        f"weight {k}: shape {tuple(weights[k].shape)} in the checkpoint, {tuple(current[k].shape)} now"
        for k in sorted(set(weights) & set(current))
        if weights[k].shape != current[k].shape
    ][:5]
    if found:
        raise CheckpointError(
            f"{path} was written for a different model: " + "; ".join(found) + ". "
            "Build the model the checkpoint was trained with (same encoder, labels, task, tuning)."
        )
    # safetensors stores tied (shared) tensors once: a name is missing only if none of its aliases is there.
    stored = {_storage(current[k]) for k in weights}
    missing = sorted(k for k, v in current.items() if k not in weights and _storage(v) not in stored)
    if missing:
        raise CheckpointError(f"{path} lacks weights of this model: {missing[:5]}")


def _storage(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


# -- RNG ----------------------------------------------------------------------------------


def _python_state(saved: Any) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _numpy_state(saved: Any) -> tuple[Any, ...]:
    kind, keys, pos, has_gauss, cached = saved
    return (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    for key, available, restore in (
        ("cuda", torch.cuda.is_available, lambda s: torch.cuda.set_rng_state_all(s)),
        ("mps", torch.backends.mps.is_available, lambda s: torch.mps.set_rng_state(s)),
    ):
        if key in state and available():
            restore(state[key])
        elif key in state:
            logger.warning(
                "the checkpoint has %s RNG state but %s is not available; dropout will differ", key, key
            )


# -- writing ------------------------------------------------------------------------------


def state_record(state: TrainState, epoch_done: bool, epoch_loss_sum: float | None = None) -> dict[str, Any]:
    # At an epoch's end the run continues at the start of the next epoch.
    loss_sum = float(state.epoch_loss) if epoch_loss_sum is None else epoch_loss_sum
    return {
        "step": state.step,
        "epoch": state.epoch + 1 if epoch_done else state.epoch,
        "batches_done": 0 if epoch_done else state.batches_done,
        "epoch_loss_sum": 0.0 if epoch_done else loss_sum,
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


def _write_json(path: Path, obj: Any) -> None:
    # repr-exact floats: a float survives the JSON round trip bit for bit.
    path.write_text(json.dumps(obj, indent=1, default=repr))


def write_files(
    directory: Path,
    tuner: FineTuner,
    state: TrainState,
    epoch_done: bool,
    data: dict[str, Any] | None,
    rng_ranks: list[dict[str, Any]] | None = None,
    epoch_loss_sum: float | None = None,
) -> None:
    """Write every checkpoint file into `directory` (a temporary one: see `_atomic`).

    `rng_ranks`: every data-parallel rank's RNG states (their dropout draws differ), kept
    beside this process's so that each rank of a resumed run continues its own stream.
    `epoch_loss_sum`: the epoch's loss sum over all ranks (None: this process's `state.epoch_loss`).
    """
    from safetensors.torch import save_model

    model = tuner.model
    save_model(model, str(directory / MODEL_FILE), metadata={"llmtune_format": str(FORMAT)})
    torch.save(state.optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(state.scheduler.state_dict(), directory / SCHEDULER_FILE)
    torch.save(state.scaler.state_dict(), directory / SCALER_FILE)
    rng = rng_state()
    if rng_ranks is not None and len(rng_ranks) > 1:
        rng["ranks"] = rng_ranks
    torch.save(rng, directory / RNG_FILE)
    callbacks = [{"class": type(c).__name__, "state": _callback_state(c)} for c in tuner.callbacks]
    torch.save(callbacks, directory / CALLBACKS_FILE)
    _write_json(directory / STATE_FILE, state_record(state, epoch_done, epoch_loss_sum))
    config = {
        "format": FORMAT,
        "model": model_summary(model),
        "data": data,
        "optimizer_class": type(state.optimizer).__name__,
        **run_summary(tuner),
    }
    _write_json(directory / CONFIG_FILE, config)


def _callback_state(callback: Any) -> dict[str, Any]:
    return callback.state_dict() if hasattr(callback, "state_dict") else {}
