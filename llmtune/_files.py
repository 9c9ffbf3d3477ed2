"""Reading sources for DatasetAdapter (CSV, JSON, text columns).

Errors name the file, line, byte, column and row.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import DataError

if TYPE_CHECKING:
    import pandas as pd

_COMPRESSED = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar")  # pandas decompresses these itself


def _lines_end_with_lf(path: str | os.PathLike) -> bool:
    """True when the first line of an uncompressed file ends with "\n" but not "\r\n"."""
    if str(path).endswith(_COMPRESSED):
        return False
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
    except OSError:  # pandas reports a missing or unreadable file itself
        return False
    return first.endswith(b"\n") and not first.endswith(b"\r\n")


def _undecodable_at(path: str | os.PathLike, encoding: str) -> str:
    """Where the first undecodable byte is (pandas reports offsets inside its read buffer)."""
    if str(path).endswith(_COMPRESSED) or os.path.getsize(path) > 256 << 20:
        return ""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return f" at line {line}, byte {err.start}"
    return ""


def read_csv(path: str | os.PathLike, *, encoding: str, sep: str, columns: Mapping[str, Any]) -> pd.DataFrame:
    """Read a CSV for `DatasetAdapter.from_csv`, refusing what pandas would misread.

    `columns` holds the adapter's `text`, `text_pair` and `label` names: text columns are read
    as text, and a missing one is named with a hint (wrong separator, no header row).
    """
    import pandas as pd

    options = {"encoding": encoding, "sep": sep, "keep_default_na": False, "na_values": [""]}
    if _lines_end_with_lf(path):
        # pandas' to_csv leaves a text holding a bare "\r" unquoted, and read_csv would end
        # the row there; in a file whose lines end with "\n", "\r" is part of the text.
        options["lineterminator"] = "\n"
    texts = {c: str for c in (columns.get("text", "text"), columns.get("text_pair")) if c is not None}
    label = columns.get("label", "label")
    if label is not None:
        texts[label] = str  # numbers only where every cell is written as one: see _label_values
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # pandas drops fields otherwise
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, **options).iloc[0].tolist()
            _check_header(str(path), header, sep, columns)
            # index_col=False: a row with one extra field would otherwise become the index.
            frame = pd.read_csv(path, index_col=False, dtype=texts, **options)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: cannot decode as {encoding} ({err.reason}{_undecodable_at(path, encoding)}); "
            "pass encoding=..., e.g. encoding='latin-1'."
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty.") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as err:
        raise DataError(f"{path}: malformed CSV ({err}); check sep={sep!r} and the quoting.") from None
    if label is not None and label in frame:
        frame[label] = _label_values(frame[label].tolist())
    return frame


_INTEGER = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_NUMBER = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def _label_values(cells: list[Any]) -> list[Any]:
    """A CSV label column's cells as ints, floats or the strings they are.

    pandas would parse "007" as 7, merging it with a "7" and predicting "7" back; codes like
    these stay strings. Missing cells (NaN) stay missing, for the adapter to refuse by row.
    """
    given = [c for c in cells if isinstance(c, str)]
    for pattern, kind in ((_INTEGER, int), (_NUMBER, float)):
        if given and all(pattern.fullmatch(c.strip()) for c in given):
            return [kind(c) if isinstance(c, str) else c for c in cells]
    return cells


def _check_header(path: str, header: list[Any], sep: str, columns: Mapping[str, Any]) -> None:
    # pandas renames a repeated column to "name.1", so duplicates are found on the raw header.
    names = [str(h) for h in header if isinstance(h, str)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: the header names column(s) {dupes} more than once; rename them.")
    wanted = {"text": columns.get("text", "text"), "text_pair": columns.get("text_pair")}
    wanted["label"] = columns.get("label", "label")
    missing = [(role, c) for role, c in wanted.items() if c is not None and c not in names]
    if not missing:
        return
    role, column = missing[0]
    hint = ""
    if len(names) == 1 and any(s in names[0] for s in (";", "\t", "|") if s != sep):
        hint = " The file may use another separator: pass sep=';' (or '\\t', '|')."
    elif len(missing) == sum(c is not None for c in wanted.values()):
        hint = (
            " If the first row is data, the file has no header row: add one naming the "
            "columns, or read it with pandas (header=None, names=[...]) and use from_pandas."
        )
    raise DataError(f"{path}: no {role} column {column!r}; the columns are {header}.{hint}")


def read_json(path: str | os.PathLike) -> dict[str, list[Any]]:
    """Columns of a JSON array of records, JSON lines or one object of columns, whichever the file holds.

    The content decides, not the extension: ".jsonl" files holding one array and ".json"
    files holding JSON lines both occur. A UTF-8 byte order mark is skipped; errors name the
    line. A key that some records lack is None (a missing value) in those rows.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}: cannot decode as utf-8 ({err.reason} at line {line}, byte {err.start}); "
            "JSON files are UTF-8: save it as UTF-8."
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty.")
    hint = "from_json reads a JSON array of records, or JSON lines (one record a line)"
    whole: Any = None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(
                f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})."
            ) from None
    if isinstance(whole, list):
        records = [(f"element {i}", record) for i, record in enumerate(whole)]
    elif isinstance(whole, dict):  # one record (perhaps on several lines), or an object of columns
        lists = [v for v in whole.values() if isinstance(v, list)]
        if lists and len(lists) == len(whole) and len({len(v) for v in lists}) == 1:
            return whole
        records = [("line 1", whole)]
    else:
        records = []
        # Split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may hold.
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); {hint}."
                ) from None
    columns: dict[str, list[Any]] = {}
    for row, (where, record) in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, {where}: expected a record (a JSON object), got {type(record).__name__}; {hint}."
            )
        for key, value in record.items():
            columns.setdefault(key, [None] * row).append(value)
        for values in columns.values():
            if len(values) == row:  # a key this record lacks
                values.append(None)
    return columns


def refuse_string(values: Any, what: str, source: str) -> None:
    # list("abc") is ["a", "b", "c"]: a string where a list belongs would become one row per character.
    if isinstance(values, (str, bytes)):
        shown = values[:40]
        raise DataError(
            f"{source}: {what} is one string ({shown!r}), not a list; pass a list, e.g. [{shown!r}]."
        )


def unencodable(columns: Mapping[str, list], names: Mapping[str, str | None], source: str) -> DataError:
    """Name the text that Arrow cannot store: one holding a lone surrogate (no valid UTF-8)."""
    for role, column in names.items():
        for row, text in enumerate(columns.get(role, ())):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                char = text[err.start]
                return DataError(
                    f"{source}, column {column!r}, row {row}: the text holds {char!r}, a lone surrogate "
                    "that is not valid Unicode (often half an emoji cut by slicing, or bytes decoded "
                    "with errors='surrogateescape'); repair or drop it, e.g. "
                    "text.encode('utf-8', 'replace').decode('utf-8')."
                )
    return DataError(f"{source}: a text cannot be encoded as UTF-8.")


def check_texts(values: Sequence[Any], column: str, source: str) -> list[str]:
    """The texts of a column as a list, refusing a value that is not a string (a missing cell)."""
    texts = list(values)
    for row, value in enumerate(texts):
        if not isinstance(value, str):
            raise DataError(
                f"{source}, column {column!r}, row {row}: expected text, got {value!r} "
                f"({type(value).__name__}); fill or drop missing texts."
            )
    return texts
