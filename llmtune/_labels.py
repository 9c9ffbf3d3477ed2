"""Label checking and mapping: raw label values -> ids, multi-hot vectors or float targets."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .errors import DataError

Task = Literal["classification", "multilabel", "regression"]
TASKS = ("classification", "multilabel", "regression")

# What spreadsheets, pandas and R write for "no value": as a label it is a missing value, not a class.
MISSING_WORDS = frozenset({"", "nan", "na", "n/a", "<na>", "none", "null"})


def _is_missing(value: Any) -> bool:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return True
    pd = sys.modules.get("pandas")  # pd.NA and pd.NaT can only occur once pandas is imported
    return pd is not None and (value is pd.NA or value is pd.NaT)


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


def _number(value: Any) -> float | None:
    """The finite number a label is or spells ("0.5"), else None ("n/a", "1,5", "NaN", True)."""
    if _kind(value) not in ("int", "float", "str"):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _is_whole(value: Any) -> bool:
    """An integer label, or a float holding one (pandas reads an int column with gaps as floats)."""
    return _kind(value) == "int" or (_kind(value) == "float" and float(value).is_integer())


def _where(source: str, column: str, row: int) -> str:
    return f"{source}, column {column!r}, row {row}"


def _missing(source: str, column: str, row: int, value: Any) -> DataError:
    return DataError(f"{_where(source, column, row)}: missing label ({value!r}); drop or fill it.")


def decode_class_labels(
    feature: Any, values: list[Any], source: str, column: str
) -> tuple[list[Any], list[str] | None]:
    """Ids of a Hugging Face `ClassLabel` column (or a list of them) -> (names per row, all names).

    Always decoded: the ids are positions in the feature's names, and matching them against
    names as strings would shift names like ["1", "0"]. Other features pass through.
    """
    import datasets

    single = isinstance(feature, datasets.ClassLabel)
    inner = getattr(feature, "feature", None)  # List/LargeList/Sequence(ClassLabel)
    if not single and not isinstance(inner, datasets.ClassLabel):
        return values, None
    names = [str(name) for name in (feature if single else inner).names]

    def name(value: Any, row: int) -> str:
        if _is_missing(value) or value == -1:  # HF marks unlabelled rows (test splits) with -1
            raise _missing(source, column, row, value)
        if not 0 <= value < len(names):
            raise DataError(
                f"{_where(source, column, row)}: label id {value!r} is out of range for "
                f"{len(names)} labels {names}."
            )
        return names[value]

    if single:
        return [name(value, row) for row, value in enumerate(values)], names
    # A null list stays None, for the missing-label check to name.
    rows = [None if value is None else [name(v, row) for v in value] for row, value in enumerate(values)]
    return rows, names


def infer_task(values: Sequence[Any], labels: Sequence[Any] | None, source: str, column: str) -> Task:
    """Guess the task: lists -> multilabel, floats -> regression, else classification.

    Texts that spell fractional numbers ("0.5", as pandas reads a column with one bad cell)
    count as floats; a float column with a few non-numbers, or a column of whole numbers with
    at most a tenth of non-numbers ("?", "x": a stray cell, not a class), is refused, naming
    the rows.
    """
    kinds: dict[str, int] = {}
    for row, value in enumerate(values):
        if _is_missing(value):
            raise _missing(source, column, row, value)
        kinds.setdefault(_kind(value), row)
    if "list" in kinds:
        return "multilabel"
    if labels is None and set(kinds) <= {"int", "float", "str"}:
        numbers_ = [_number(value) for value in values]
        bad = [row for row, n in enumerate(numbers_) if n is None and isinstance(values[row], str)]
        if "float" in kinds or any(n is not None and not n.is_integer() for n in numbers_):
            if 2 * len(bad) < len(values):  # mostly floats (or texts spelling them): regression
                if bad:
                    raise _stray_text(values, bad, source, column)
                return "regression"
        elif bad and 10 * len(bad) <= len(values):  # whole numbers and a stray "?": not a new class
            raise _stray_text(values, bad, source, column)
    return "classification"


def _stray_text(values: Sequence[Any], bad: list[int], source: str, column: str) -> DataError:
    # One bad cell makes pandas read the whole column as text, which would become one class per value.
    shown = ", ".join(f"row {row}: {values[row]!r}" for row in bad[:3])
    more = f" (and {len(bad) - 3} more rows)" if len(bad) > 3 else ""
    return DataError(
        f"{source}: column {column!r} is numeric except {shown}{more}; fix or drop those rows, "
        "or pass task='classification' if it is one."
    )


def map_labels(
    values: Sequence[Any], task: Task, labels: Sequence[Any] | None, source: str, column: str
) -> tuple[list[str] | None, list[Any]]:
    """(label names in id order, encoded labels): ids, multi-hot lists or float targets.

    Without `labels`, the names are the sorted distinct values; integers sort as numbers, so
    labels 1..5 get names "1".."5" (ids 0..4) and {0, 5, 10} get three outputs.
    """
    if task == "regression":
        return None, _targets(values, source, column)
    if task == "multilabel" and (width := _multi_hot_width(values)):
        names = _given_names(labels) if labels is not None else [str(i) for i in range(width)]
        if len(names) != width:
            raise DataError(
                f"{source}, column {column!r}: rows are 0/1 vectors of {width} labels, but "
                f"{len(names)} label names were given: {names}."
            )
        return names, [[float(v) for v in value] for value in values]
    rows = _flatten(values, task, source, column)
    names = _given_names(labels) if labels is not None else _names(rows, source, column)
    index = {name: i for i, name in enumerate(names)}
    # Integer ids against named labels (from_lists(labels=[1, 0], label_names=["neg", "pos"])),
    # never against names that are numbers ("1.0", "2.5"): there a 1 is a value, not an id.
    numbers = [_number(name) for name in names]
    ids_ok = labels is not None and all(n is None for n in numbers)

    def one(value: Any, row: int) -> int:
        if str(value) in index:
            return index[str(value)]
        if ids_ok and _is_whole(value):
            if 0 <= int(value) < len(names):
                return int(value)
            raise DataError(
                f"{_where(source, column, row)}: label id {value!r} is out of range for "
                f"{len(names)} labels {names}."
            )
        if _kind(value) in ("int", "float") and (n := _number(value)) is not None and numbers.count(n) == 1:
            return numbers.index(n)  # 5.0 is label "5", and 1 is label "1.0"
        near = (
            f" (it differs from {value.strip()!r} by surrounding spaces)"
            if (isinstance(value, str) and value.strip() in index)
            else ""
        )
        raise DataError(
            f"{_where(source, column, row)}: label {value!r} is not one of the labels {names}{near}. "
            "If it is new here (e.g. in validation data), it was never seen in training."
        )

    if task == "classification":
        return names, [one(value, row) for row, value in rows]
    hot = [[0.0] * len(names) for _ in values]
    for row, value in rows:
        hot[row][one(value, row)] = 1.0
    return names, hot


def _multi_hot_width(values: Sequence[Any]) -> int | None:
    """K when every row is a 0/1 vector of one length K >= 2 (scikit-learn's MultiLabelBinarizer).

    Read as lists of label names such rows repeat a name or give every row every label, so a
    0/1 vector is the only sensible reading.
    """
    widths = set()
    for value in values:
        if _kind(value) != "list":
            return None
        if not all(_kind(v) in ("int", "float", "bool") and v in (0, 1) for v in value):
            return None
        widths.add(len(value))
    width = widths.pop() if len(widths) == 1 else 0
    return width if width >= 2 else None


def _targets(values: Sequence[Any], source: str, column: str) -> list[float]:
    out = []
    for row, value in enumerate(values):
        if _kind(value) in ("int", "float") and not _is_missing(value) and not math.isfinite(value):
            raise DataError(f"{_where(source, column, row)}: regression target {value!r} is not finite.")
        number = None if _is_missing(value) else _number(value)
        if number is None:
            raise DataError(f"{_where(source, column, row)}: regression target {value!r} is not a number.")
        out.append(number)
    return out


def _flatten(values: Sequence[Any], task: Task, source: str, column: str) -> list[tuple[int, Any]]:
    """(row, label) pairs, one per label: a multi-label row gives one pair per element."""
    rows = []
    for row, value in enumerate(values):
        if _is_missing(value):
            raise _missing(source, column, row, value)
        if task == "classification":
            if _kind(value) == "list":
                raise DataError(
                    f"{_where(source, column, row)}: a list of labels {value!r} in a single-label "
                    "task; pass task='multilabel'."
                )
            rows.append((row, value))
            continue
        if _kind(value) != "list":
            raise DataError(f"{_where(source, column, row)}: expected a list of labels, got {value!r}.")
        for v in value:
            if _is_missing(v):
                raise _missing(source, column, row, v)
            if _kind(v) == "list":
                raise DataError(
                    f"{_where(source, column, row)}: a list inside the label list {value!r}; "
                    "each row holds a flat list of label names."
                )
            rows.append((row, v))
    return rows


def _given_names(labels: Sequence[Any]) -> list[str]:
    names = [str(name) for name in labels]
    if len(set(names)) != len(names):
        raise DataError(f"labels contain duplicates: {names}")
    return names


def _names(rows: list[tuple[int, Any]], source: str, column: str) -> list[str]:
    """Sorted distinct labels, refusing what would silently become a wrong class."""
    if not rows:
        raise DataError("no label values at all (every label list is empty); nothing to learn.")
    kinds: dict[str, int] = {}
    for row, value in rows:
        kinds.setdefault(_kind(value), row)
    if len(kinds) > 1 and set(kinds) != {"int", "float"}:  # 1 and "1" would become one class
        shown = ", ".join(f"row {r} is {k}" for k, r in kinds.items())
        raise DataError(f"{source}, column {column!r}: mixed label types ({shown}); use one type.")
    kind, row = next(iter(kinds.items()))
    if kind not in ("int", "float", "str", "bool"):
        raise DataError(f"{_where(source, column, row)}: unsupported label type {kind}.")
    if all(_is_whole(value) for _, value in rows):
        return [str(i) for i in sorted({int(value) for _, value in rows})]
    if kind == "str":
        _check_spellings(rows, source, column)
        return sorted({value for _, value in rows})
    by_name = {str(value): value for _, value in rows}
    return sorted(by_name, key=lambda name: (float(by_name[name]), name))  # numbers in numeric order


def _check_spellings(rows: list[tuple[int, str]], source: str, column: str) -> None:
    missing = [(row, value) for row, value in rows if value.strip().lower() in MISSING_WORDS]
    if missing:
        row, value = missing[0]
        others = sorted({r for r, _ in missing[1:]} - {row})
        also = f" (also rows {others[:10]})" if others else ""
        raise DataError(
            f"{_where(source, column, row)}: label {value!r} reads as a missing value, not a "
            f"class{also}; drop or fill those rows, or pass labels=[...] naming it if it is a real class."
        )
    spellings: dict[str, dict[str, int]] = {}
    for row, value in rows:
        spellings.setdefault(value.strip(), {}).setdefault(value, row)
    for seen in spellings.values():
        if len(seen) > 1:
            (a, row_a), (b, row_b) = list(seen.items())[:2]
            raise DataError(
                f"{source}, column {column!r}: labels {a!r} (row {row_a}) and {b!r} (row {row_b}) "
                "differ only by surrounding spaces; strip them (e.g. frame[column].str.strip())."
            )
