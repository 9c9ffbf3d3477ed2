"""Label checking and mapping: raw label values -> ids, multi-hot vectors or float targets."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .errors import DataError

Task = Literal["classification", "multilabel", "regression"]
TASKS = ("classification", "multilabel", "regression")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):  # its own kind: True must not become label "1"
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "list"
    return type(value).__name__


def _where(source: str, column: str, row: int) -> str:
    return f"{source}, column {column!r}, row {row}"


def infer_task(values: Sequence[Any], labels: Sequence[Any] | None, source: str, column: str) -> Task:
    """Guess the task from the labels: lists -> multilabel, floats -> regression, else classification."""
    kinds: dict[str, int] = {}
    for row, value in enumerate(values):
        if _is_missing(value):
            raise DataError(f"{_where(source, column, row)}: missing label ({value!r}); drop or fill it.")
        kinds.setdefault(_kind(value), row)
    if set(kinds) - {"int", "float"} and len(kinds) > 1:
        shown = ", ".join(f"row {r} is {k}" for k, r in kinds.items())
        raise DataError(f"{source}, column {column!r}: mixed label types ({shown}); use one type.")
    if "list" in kinds:
        return "multilabel"
    if "float" in kinds and labels is None:
        return "regression"
    if set(kinds) <= {"int", "str", "float", "bool"}:
        return "classification"
    bad = next(iter(kinds))
    raise DataError(f"{_where(source, column, kinds[bad])}: unsupported label type {bad}.")


def label_names(values: Sequence[Any], task: Task, labels: Sequence[Any] | None) -> list[str] | None:
    """The ordered label names: given ones, else sorted unique values.

    Small integer ids keep their own index (0..max); sparse integer codes are sorted numerically.
    """
    if task == "regression":
        return None
    if labels is not None:
        names = [str(name) for name in labels]
        if len(set(names)) != len(names):
            raise DataError(f"labels contain duplicates: {names}")
        return names
    flat = [v for value in values for v in value] if task == "multilabel" else list(values)
    if not flat:
        raise DataError("no label values at all (every label list is empty); nothing to learn.")
    # Integer ids (1.0 counts as 1, so a column that pandas read as floats maps the same way).
    if all(_kind(v) == "int" or (_kind(v) == "float" and float(v).is_integer()) for v in flat):
        ids = sorted({int(v) for v in flat})
        if ids[0] < 0:
            raise DataError(f"negative integer label {ids[0]}; ids start at 0.")
        if ids[-1] < max(2 * len(ids), 100):  # dense: 0..max, so label i is output i
            return [str(i) for i in range(ids[-1] + 1)]
        return [str(i) for i in ids]  # sparse codes (years, product ids): one output each
    return sorted({str(v) for v in flat})


def encode(values: Sequence[Any], task: Task, names: list[str] | None, source: str, column: str) -> list[Any]:
    """Map raw label values to what the objective consumes: ids, multi-hot lists or floats."""
    if task == "regression":
        out = []
        for row, value in enumerate(values):
            if _is_missing(value) or _kind(value) not in ("int", "float"):
                raise DataError(
                    f"{_where(source, column, row)}: regression target {value!r} is not a number."
                )
            if not math.isfinite(float(value)):
                raise DataError(f"{_where(source, column, row)}: regression target {value!r} is not finite.")
            out.append(float(value))
        return out
    assert names is not None
    index = {name: i for i, name in enumerate(names)}

    def one(value: Any, row: int) -> int:
        if _is_missing(value):
            raise DataError(f"{_where(source, column, row)}: missing label ({value!r}); drop or fill it.")
        if str(value) in index:
            return index[str(value)]
        # Integer ids against named labels (an HF ClassLabel column with labels=[...]).
        is_id = _kind(value) == "int" or (_kind(value) == "float" and float(value).is_integer())
        if is_id and not any(n.lstrip("-").isdigit() for n in names):
            if 0 <= int(value) < len(names):
                return int(value)
            raise DataError(
                f"{_where(source, column, row)}: label id {value!r} is out of range for "
                f"{len(names)} labels {names}."
            )
        if _kind(value) == "float" and float(value).is_integer() and str(int(value)) in index:
            return index[str(int(value))]
        raise DataError(
            f"{_where(source, column, row)}: label {value!r} is not one of the labels {names}. "
            "If it is new here (e.g. in validation data), it was never seen in training."
        )

    if task == "multilabel":
        out = []
        for row, value in enumerate(values):
            if _kind(value) != "list":
                raise DataError(f"{_where(source, column, row)}: expected a list of labels, got {value!r}.")
            hot = [0.0] * len(names)
            for v in value:
                hot[one(v, row)] = 1.0
            out.append(hot)
        return out
    return [one(value, row) for row, value in enumerate(values)]
