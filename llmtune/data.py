"""DatasetAdapter: any text source -> checked, labelled examples -> tokenized, padded batches."""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _files, _labels
from ._batching import BatchLoader, Tokenized
from ._labels import Task
from ._tokens import encode, padding
from .errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets  # imported where used: it pulls in pandas and pyarrow (~0.5 s)

__all__ = ["DatasetAdapter"]


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    # datasets draws a bar per map() call; tokenizing is quick and the bars clutter training logs.
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


class DatasetAdapter:
    """Labelled text examples, held as a `datasets.Dataset` with columns text[, text_pair][, label].

    Build one with a `from_*` constructor; labels are checked and mapped once, here, so bad
    data fails before training. Subclass and add a `from_*` classmethod for a new format.

    Args:
        dataset: the source rows: a `datasets.Dataset` or a mapping of column -> values.
        text: column holding the text.
        text_pair: optional column holding the second text of a pair (NLI, QA...).
        label: column holding labels, or None for unlabelled data (prediction only).
        labels: the label names in id order; pass `train.labels` when building validation
            or test data separately, so every split shares one mapping. Without it, the
            names are the sorted distinct labels (integers in numeric order: labels 1..5 get
            names "1".."5", ids 0..4), or a Hugging Face `ClassLabel` column's names.
        task: "classification", "multilabel", "regression" or "auto" (from the label values:
            lists -> multilabel, floats -> regression, strings/ints -> classification).
        source: a name for error messages (a file path, say).

    Raises:
        DataError: missing column (the message lists the columns present), empty data,
            a non-text value in the text column, or a label that cannot be mapped or would
            silently become a wrong class ("NA", " pos" beside "pos", "n/a" in a column of
            numbers).

    Example:
        >>> data = DatasetAdapter.from_lists(["good", "bad", "fine"], ["pos", "neg", "pos"])
        >>> data.labels, data.task, len(data)
        (['neg', 'pos'], 'classification', 3)
    """

    def __init__(
        self,
        dataset: datasets.Dataset | Mapping[str, Sequence[Any]],
        *,
        text: str = "text",
        text_pair: str | None = None,
        label: str | None = "label",
        labels: Sequence[Any] | None = None,
        task: str = "auto",
        source: str = "dataset",
    ) -> None:
        if task != "auto" and task not in _labels.TASKS:
            raise ConfigError(f"task must be 'auto' or one of {_labels.TASKS}, got {task!r}")
        import datasets

        is_hf = isinstance(dataset, datasets.Dataset)
        present = list(dataset.column_names if is_hf else dataset)
        for role, column in (("text", text), ("text_pair", text_pair), ("label", label)):
            if column is not None and column not in present:
                raise DataError(f"{source}: no {role} column {column!r}; the columns are {present}.")
            if column is not None and not is_hf:
                _files.refuse_string(dataset[column], f"column {column!r}", source)
        _files.refuse_string(labels, "labels", source)
        if len(dataset[text]) == 0:
            raise DataError(f"{source}: the dataset is empty.")
        columns = {"text": _files.check_texts(dataset[text], text, source)}
        if text_pair is not None:
            columns["text_pair"] = _files.check_texts(dataset[text_pair], text_pair, source)
        self.labels: list[str] | None = None
        self.task: Task | None = None
        if label is not None:
            values = list(dataset[label])
            if len(values) != len(columns["text"]):
                raise DataError(f"{source}: {len(columns['text'])} texts but {len(values)} labels.")
            feature = dataset.features.get(label) if is_hf else None
            values, class_names = _labels.decode_class_labels(feature, values, source, label)
            labels = class_names if labels is None else labels
            self.task = task if task != "auto" else _labels.infer_task(values, labels, source, label)
            self.labels, columns["label"] = _labels.map_labels(values, self.task, labels, source, label)
        try:
            self.dataset = datasets.Dataset.from_dict(columns)
        except UnicodeEncodeError:
            names = {"text": text, "text_pair": text_pair}
            raise _files.unencodable(columns, names, source) from None
        self.source = source
        self._tokenized: dict[tuple, Tokenized] = {}

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_hf(
        cls, dataset: datasets.Dataset | datasets.DatasetDict, **kwargs: Any
    ) -> DatasetAdapter | dict[str, DatasetAdapter]:
        """From a `datasets.Dataset`, or a `DatasetDict` -> one adapter per split.

        The splits of a DatasetDict share the label mapping of "train" (or the first split).
        """
        import datasets

        if isinstance(dataset, datasets.DatasetDict):
            names = list(dataset)
            first = "train" if "train" in dataset else names[0]
            head = cls(dataset[first], source=f"split {first!r}", **kwargs)
            shared = {**kwargs, "labels": head.labels, "task": head.task or "auto"}
            return {
                n: head if n == first else cls(dataset[n], source=f"split {n!r}", **shared) for n in names
            }
        return cls(dataset, **kwargs)

    @classmethod
    def from_pandas(cls, frame: Any, **kwargs: Any) -> DatasetAdapter:
        """From a pandas DataFrame (its index is dropped).

        Column names become strings; integer names (`read_csv(header=None)`) can be passed
        as they are: `from_pandas(frame, text=0, label=1)`.
        """
        kwargs.setdefault("source", "DataFrame")
        names = [str(c) for c in frame.columns]
        dupes = sorted(name for name, n in Counter(names).items() if n > 1)  # 0 and "0" collide too
        if dupes:
            raise DataError(f"{kwargs['source']}: duplicate column names {dupes}; rename them.")
        for role in ("text", "text_pair", "label"):
            if isinstance(kwargs.get(role), int):
                kwargs[role] = str(kwargs[role])
        return cls({name: frame[c].tolist() for name, c in zip(names, frame.columns)}, **kwargs)

    @classmethod
    def from_csv(
        cls, path: str | os.PathLike, *, encoding: str = "utf-8", sep: str = ",", **kwargs: Any
    ) -> DatasetAdapter:
        """From a CSV file with a header row; `encoding` for files that are not UTF-8.

        Text columns are read as text (a column of numbers stays "123"); empty cells are
        missing values, which the text and label columns refuse. A header that names a
        column twice and rows with more fields than the header are refused too.
        """
        frame = _files.read_csv(path, encoding=encoding, sep=sep, columns=kwargs)
        kwargs.setdefault("source", str(path))
        return cls.from_pandas(frame, **kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **kwargs: Any) -> DatasetAdapter:
        """From a JSON array of records or a JSON-lines file (one record a line).

        The content decides which, not the extension; errors name the line.
        """
        columns = _files.read_json(path)
        kwargs.setdefault("source", str(path))
        return cls(columns, **kwargs)

    @classmethod
    def from_lists(
        cls,
        texts: Sequence[str],
        labels: Sequence[Any] | None = None,
        *,
        text_pairs: Sequence[str] | None = None,
        label_names: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> DatasetAdapter:
        """From Python lists: texts, their labels and optionally the second texts of pairs."""
        kwargs.setdefault("source", "lists")
        given = {"texts": texts, "labels": labels, "text_pairs": text_pairs, "label_names": label_names}
        for name, column in given.items():
            _files.refuse_string(column, name, kwargs["source"])
        columns: dict[str, list] = {"text": list(texts)}
        for name, column in (("labels", labels), ("text_pairs", text_pairs)):
            if column is not None and len(column) != len(texts):
                raise DataError(f"{len(texts)} texts but {len(column)} {name}.")
        if labels is not None:
            columns["label"] = list(labels)
        if text_pairs is not None:
            columns["text_pair"] = list(text_pairs)
        return cls(
            columns,
            text_pair="text_pair" if text_pairs is not None else None,
            label="label" if labels is not None else None,
            labels=label_names,
            **kwargs,
        )

    # -- views --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"DatasetAdapter({len(self)} examples, task={self.task}, labels={self.labels})"

    @property
    def has_pairs(self) -> bool:
        return "text_pair" in self.dataset.column_names

    @property
    def has_labels(self) -> bool:
        return "label" in self.dataset.column_names

    @property
    def num_labels(self) -> int:
        """Output width the data needs: number of labels, or 1 for regression."""
        return len(self.labels) if self.labels is not None else 1

    def to_list(self) -> list[dict[str, Any]]:
        """The examples as dicts with keys text[, text_pair][, label] (label already mapped)."""
        return self.dataset.to_list()

    def select(self, indices: Sequence[int] | np.ndarray) -> DatasetAdapter:
        """A new adapter over the chosen rows, sharing this one's label mapping."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.dataset = self.dataset.select(np.asarray(indices, dtype=np.int64))
        new._tokenized = {}
        return new

    def split(self, validation: float | int = 0.1, *, seed: int = 0) -> tuple[DatasetAdapter, DatasetAdapter]:
        """Split into (train, validation); stratified by label for single-label classification.

        Args:
            validation: fraction (0 < f < 1) or number of examples for validation.
            seed: makes the split reproducible.
        """
        n = len(self)
        # A fraction is any float, numpy's too (np.float32(0.1) was read as the count 0).
        fraction = isinstance(validation, numbers.Real) and not isinstance(validation, numbers.Integral)
        n_val = round(float(validation) * n) if fraction else int(validation)
        if not 0 < n_val < n:
            raise DataError(f"validation={validation!r} leaves {n_val} of {n} examples for validation.")
        rng = np.random.default_rng(seed)
        if self.task == "classification":
            val_idx = self._stratified(np.asarray(self.dataset["label"]), n_val, rng)
        else:
            val_idx = rng.permutation(n)[:n_val]
        is_val = np.zeros(n, dtype=bool)
        is_val[val_idx] = True
        return self.select(np.flatnonzero(~is_val)), self.select(np.flatnonzero(is_val))

    @staticmethod
    def _stratified(ids: np.ndarray, n_val: int, rng: np.random.Generator) -> np.ndarray:
        # Largest-remainder allocation: each class gives its share, the total is exactly n_val.
        # Each class keeps at least one example for training while the total allows it, so
        # validation never holds a class that training lacks.
        classes, counts = np.unique(ids, return_counts=True)
        share = counts * n_val / len(ids)
        room = counts - 1 if n_val <= (counts - 1).sum() else counts
        take = np.minimum(np.floor(share).astype(int), room)
        order = np.argsort(-(share - take) + rng.random(len(classes)) * 1e-9)
        while take.sum() < n_val:  # one more each, furthest below its share first
            for c in order[take[order] < room[order]][: n_val - take.sum()]:
                take[c] += 1
        picks = [rng.permutation(np.flatnonzero(ids == c))[:k] for c, k in zip(classes, take)]
        return np.sort(np.concatenate(picks))

    # -- tokenization and batching -------------------------------------------------------

    def tokenize(self, tokenizer: Any, max_length: int, stride: int | None = None) -> Tokenized:
        """Token rows through `datasets.map`, once per (tokenizer, max_length, stride); reused after.

        With `stride`, a text longer than `max_length` becomes overlapping windows, each a
        row carrying its text's label (see `_tokens.encode`).
        """
        key = (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), max_length, stride)
        # Two vocabularies grown from one base to the same size differ in their added tokens.
        added = hashlib.sha256(repr(sorted(tokenizer.get_added_vocab().items())).encode()).hexdigest()
        key += (tokenizer.padding_side, getattr(tokenizer, "truncation_side", "right"), added)
        if key not in self._tokenized:
            pad = padding(tokenizer)
            pair, labelled = self.has_pairs, self.has_labels

            def rows(batch: dict[str, list], index: list[int]) -> dict[str, list]:
                out = encode(
                    tokenizer, batch["text"], batch["text_pair"] if pair else None, max_length, stride
                )
                if labelled:
                    out["label"] = [batch["label"][i] for i in out["text"]]
                out["text"] = [index[i] for i in out["text"]]
                return out

            with _no_progress_bars():
                encoded = self.dataset.map(
                    rows, batched=True, with_indices=True, remove_columns=self.dataset.column_names
                )
            labels = None
            if labelled:
                dtype = np.int64 if self.task == "classification" else np.float32
                labels = np.asarray(list(encoded["label"]), dtype=dtype)
            types = encoded["token_type_ids"] if "token_type_ids" in encoded.column_names else None
            self._tokenized[key] = Tokenized.from_rows(
                list(encoded["input_ids"]),
                None if types is None else list(types),
                labels,
                **pad,
                text=encoded["text"],
            )
        return self._tokenized[key]

    def loader(
        self,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        max_length: int = 512,
        stride: int | None = None,
        shuffle: bool = False,
        group_by_length: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_multiple: int = 1,
    ) -> BatchLoader:
        """Batches of dict(input_ids, attention_mask[, token_type_ids][, labels]) tensors,
        each padded to its own longest example (rounded up to `pad_multiple`). `group_by_length`
        puts similar lengths together (random order of groups, reproducible from `seed` and
        the epoch)."""
        return BatchLoader(
            self.tokenize(tokenizer, max_length, stride),
            batch_size,
            shuffle=shuffle,
            group_by_length=group_by_length,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            pad_multiple=pad_multiple,
        )

    def check_trainable(self) -> None:
        """Refuse labelled data that gives a classifier nothing to tell apart: one class only.

        The adapter cannot know it holds training data, so the trainer calls this on its
        training set (validation may well hold a single class).

        Raises:
            DataError: no label column, or fewer than two classes occur (classification).

        Example:
            >>> DatasetAdapter.from_lists(["good", "bad"], ["pos", "neg"]).check_trainable()
        """
        self.check_compatible(None, None, "training")
        if self.task != "classification":
            return
        ids, counts = np.unique(np.asarray(self.dataset["label"]), return_counts=True)
        if len(ids) < 2:
            assert self.labels is not None
            raise DataError(
                f"training data ({self.source}) holds one class only, {self.labels[ids[0]]!r} "
                f"(all {counts[0]} examples); a classifier needs examples of at least two. "
                "Check the label column and the filter or split that built this set."
            )

    def check_compatible(self, labels: Sequence[str] | None, task: str | None, role: str) -> None:
        """Refuse data whose label mapping or task differs from the model's."""
        if not self.has_labels:
            raise DataError(f"{role} data ({self.source}) has no label column.")
        if task is not None and self.task != task:
            raise ConfigError(f"{role} data is {self.task} but the model is {task}.")
        if labels is not None and self.labels != list(labels):
            raise ConfigError(
                f"{role} data ({self.source}) has labels {self.labels} but the model has "
                f"{list(labels)}; build it with labels=model.labels (or train.labels)."
            )
