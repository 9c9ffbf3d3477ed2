"""The run record a fit leaves on its model, and the model card (README.md) `save_pretrained` writes from it.

The card is in the Hugging Face format (YAML front matter, then Markdown), written and read
with `huggingface_hub`'s own `ModelCard`; the experiment loggers log the same settings.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import FineTuner

CARD_FILE = "README.md"
_TASK_TAGS = {
    "classification": "text-classification",
    "multilabel": "multi-label",
    "regression": "regression",
}
_PRECISIONS = {"None": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _base_name(model: Any) -> str:
    """The name or directory of the pretrained encoder the model started from (a directory made absolute)."""
    encoder = getattr(model, "encoder", None)
    if hasattr(encoder, "get_base_model"):  # a peft wrapper
        encoder = encoder.get_base_model()
    name = str(getattr(encoder, "name_or_path", "") or "")
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def training_setup(tuner: FineTuner, train: Any = None, validation: Any = None) -> dict[str, Any]:
    """The run's settings as one flat dict of JSON values: what a logger records as hyperparameters.

    FineTuner settings (epochs, batch size, precision, ...), the optimizer factory's fields
    (`optimizer.lr`, `optimizer.head_lr`, schedule, warmup), the tuning strategy and its
    fields, the model (base, type, task, labels, pooling, max length) and the data sizes.
    """
    from ._checkpoint_format import tuner_settings

    settings = tuner_settings(tuner)
    optimizer = settings.pop("optimizer")
    flat: dict[str, Any] = dict(settings)
    # What the run does with those settings (epochs=None and probe=None leave it to the data).
    state = getattr(tuner, "state", None)
    flat["planned_steps"] = getattr(state, "total_steps", None)
    flat["probed"] = getattr(tuner, "probed", None)
    flat["precision"] = _PRECISIONS.get(flat["precision"], flat["precision"])
    if isinstance(optimizer, dict):
        flat |= {f"optimizer.{k}": v for k, v in optimizer.items() if k != "options" or v}
        head_lr = getattr(tuner.optimizer, "resolved_head_lr", None)
        if head_lr is not None:
            flat["optimizer.head_lr"] = head_lr  # "auto" means max(lr, 1e-3): log the number
    else:
        flat["optimizer"] = optimizer
    model = tuner.model
    tuning = getattr(model, "tuning", None)
    flat["strategy"] = type(tuning).__name__ if tuning is not None else "Full"
    if tuning is not None and is_dataclass(tuning):
        flat |= {f"strategy.{k}": v for k, v in asdict(tuning).items()}
    config = getattr(getattr(model, "encoder", None), "config", None)
    flat |= {
        "model.base": _base_name(model),
        "model.type": getattr(config, "model_type", None),
        "model.layers": getattr(config, "num_hidden_layers", None),
        "model.task": getattr(model, "task", None),
        "model.labels": getattr(model, "labels", None),
        "model.pooling": getattr(model, "pooling", None),
        "model.max_length": getattr(model, "max_length", None),
        "model.stride": getattr(model, "stride", None),
        "model.aggregation": getattr(model, "aggregation", None) if getattr(model, "stride", None) else None,
        "data.train_examples": None if train is None else len(train),
        "data.validation_examples": None if validation is None else len(validation),
        "world_size": tuner.dist.world_size,
    }
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def run_record(tuner: FineTuner, train: Any, validation: Any) -> dict[str, Any]:
    """What a finished fit leaves on its model (`model.training_record`) for the model card.

    The validation metrics are those of the weights the model now holds: the best epoch's
    when a `KeepBest` callback restored it, else the last epoch's.
    """
    from .callbacks import KeepBest

    records = tuner.state.history.records
    keeper = next((c for c in tuner.callbacks if isinstance(c, KeepBest) and c.weights), None)
    kept = None if keeper is None else keeper.best_epoch
    chosen = next((r for r in records if kept is not None and r.get("epoch") == kept + 1), None)
    if kept == -1:  # the probed head, before the first epoch, was the best (kept across a resume)
        chosen = {"epoch": 0, **{f"val_{k}": v for k, v in (keeper.best_metrics or {}).items()}}
    chosen = chosen or (records[-1] if records else {})
    return {
        "setup": training_setup(tuner, train, validation),
        "data": {
            "train": getattr(train, "source", None),
            "validation": getattr(validation, "source", None) if validation is not None else None,
        },
        "epochs_run": len(records),
        "steps": tuner.state.step,
        "epoch": chosen.get("epoch"),
        "train_loss": chosen.get("train_loss"),
        "validation": {k[4:]: v for k, v in chosen.items() if k.startswith("val_")},
        "date": datetime.date.today().isoformat(),
    }


def _front_matter(model: Any, name: str, base: str, record: dict[str, Any] | None) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    task = getattr(model, "task", "classification")
    tags = ["llmtune", "text-classification", _TASK_TAGS.get(task, task)]
    tuning = getattr(model, "tuning", None)
    if tuning is not None:
        tags.append(type(tuning).__name__.lower())
    metrics = dict((record or {}).get("validation") or {})
    results = [
        EvalResult(
            task_type="text-classification",
            dataset_type="custom",
            dataset_name=str((record or {}).get("data", {}).get("validation") or "validation data"),
            dataset_split="validation",
            metric_type=metric,
            metric_value=float(value),
            metric_name=f"validation {metric}",
        )
        for metric, value in metrics.items()
    ]
    return ModelCardData(
        base_model=base if base and _HUB_ID.match(base) and not Path(base).exists() else None,
        library_name="llmtune",
        pipeline_tag="text-classification",
        tags=list(dict.fromkeys(tags)),
        metrics=sorted(metrics) or None,
        model_name=name if results else None,
        eval_results=results or None,
        labels=getattr(model, "labels", None),
        task=task,
    )


def _body(model: Any, name: str, base: str, record: dict[str, Any] | None) -> str:
    task = getattr(model, "task", "classification")
    kind = {"classification": "text classification", "multilabel": "multi-label text classification"}
    lines = [
        f"# {name}",
        "",
        f"A {kind.get(task, task)} model made with llmtune from `{base or 'an encoder'}`.",
    ]
    labels = getattr(model, "labels", None)
    if labels:
        lines += ["", "Labels: " + ", ".join(f"`{label}`" for label in labels) + "."]
    if record is None:
        lines += ["", "It was saved without a training record (no `FineTuner.fit` in its history)."]
    else:
        setup = record["setup"]
        lines += ["", "## Training", "", f"Trained on {record['date']}: {record['epochs_run']} epochs, "]
        lines[-1] += f"{record['steps']} optimizer steps, on {setup.get('data.train_examples')} examples"
        checked = setup.get("data.validation_examples")
        lines[-1] += f" ({record['data']['train']}); " + (
            f"validated on {checked}." if checked is not None else "no validation data."
        )
        lines += ["", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in setup.items() if v not in (None, "")]
        if record["validation"]:
            lines += ["", f"## Validation results (epoch {record['epoch']}, the weights saved)", ""]
            lines += ["| metric | value |", "| --- | ---: |"]
            lines += [f"| {k} | {v:.4f} |" for k, v in record["validation"].items()]
    lines += _calibration_lines(model)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from llmtune import ClassifierModel",
        "",
        f'model = ClassifierModel.from_pretrained("{name}")',
        'print(model.predict(["a text to classify"]))',
        "```",
        "",
    ]
    return "\n".join(lines)


def _calibration_lines(model: Any) -> list[str]:
    temperature = getattr(model, "temperature", 1.0)
    thresholds, threshold = getattr(model, "thresholds", None), getattr(model, "threshold", None)
    if (temperature, thresholds, threshold) == (1.0, None, None):
        return []
    link = "sigmoid" if getattr(model, "task", None) == "multilabel" else "softmax"  # as predict_proba
    lines = [
        "",
        "## Calibration",
        "",
        f"Probabilities are {link}(logits / {temperature:.4g}) (temperature scaling",
    ]
    lines[-1] += " fitted by `ClassifierModel.calibrate` on held-out data)."
    if thresholds is not None:
        lines[-1] += " Per-label decision thresholds: " + ", ".join(f"{t:.3g}" for t in thresholds) + "."
    if threshold is not None:
        lines[-1] += f" The second label is predicted at probability {threshold:.3g} or above."
    return lines


def write_card(model: Any, directory: Path, name: str) -> None:
    """Write `directory/README.md` for the model saved as `name`, from `model.training_record`.

    A model without a record (never fitted, or loaded and saved again) gets a minimal card.
    """
    from huggingface_hub import ModelCard

    record = getattr(model, "training_record", None)
    base = _base_name(model)
    data = _front_matter(model, name, base, record)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(model, name, base, record)}").save(
        Path(directory) / CARD_FILE
    )
