"""Label mapping (llmtune/_labels.py): no invented classes, ClassLabel names decoded, bad cells named."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtune import DataError, DatasetAdapter

# -- integer labels --------------------------------------------------------------------------


def test_integer_labels_map_to_the_values_that_occur():
    stars = DatasetAdapter.from_lists(list("abcde"), [1, 2, 3, 4, 5])
    assert stars.labels == ["1", "2", "3", "4", "5"] and stars.dataset["label"] == [0, 1, 2, 3, 4]
    sparse = DatasetAdapter.from_lists(list("abcd"), [10, 0, 5, 10])
    assert sparse.labels == ["0", "5", "10"] and sparse.num_labels == 3
    assert sparse.dataset["label"] == [2, 0, 1, 2]
    signed = DatasetAdapter.from_lists(list("abc"), [-1, 1, -1])
    assert signed.labels == ["-1", "1"] and signed.dataset["label"] == [0, 1, 0]
    dense = DatasetAdapter.from_lists(list("abc"), [2, 0, 1])  # already 0..k-1: ids are the labels
    assert dense.labels == ["0", "1", "2"] and dense.dataset["label"] == [2, 0, 1]


def test_validation_built_with_train_labels_maps_integers_the_same_way():
    train = DatasetAdapter.from_lists(list("abcde"), [1, 2, 3, 4, 5])
    val = DatasetAdapter.from_lists(["x", "y"], [5, 2], label_names=train.labels)
    assert val.labels == train.labels and val.dataset["label"] == [4, 1]
    # pandas reads an int column with a gap as floats: 5.0 is label "5" too.
    floats = DatasetAdapter.from_pandas(
        pd.DataFrame({"text": ["x", "y", "z"], "label": [5, 2, None]}).dropna(), labels=train.labels
    )
    assert floats.dataset["label"] == [4, 1]
    sparse = DatasetAdapter.from_lists(list("abc"), [10.0, 5.0, 10.0], task="classification")
    assert sparse.labels == ["5", "10"] and sparse.dataset["label"] == [1, 0, 1]


def test_integers_against_fractional_label_names_are_values_not_ids():
    # Half stars as classes; pandas reads a split without halves as ints: 1 is "1.0", not id 1.
    train = DatasetAdapter.from_lists(list("abcd"), [1.0, 1.5, 2.0, 2.5], task="classification")
    assert train.labels == ["1.0", "1.5", "2.0", "2.5"]
    val = DatasetAdapter.from_lists(["x", "y"], [1, 2], label_names=train.labels)
    assert val.dataset["label"] == [0, 2]
    with pytest.raises(DataError, match="label 3 is not one of the labels"):
        DatasetAdapter.from_lists(["x"], [3], label_names=train.labels)


def test_booleans_stay_their_own_kind():
    flags = DatasetAdapter.from_lists(["a", "b"], [True, False])
    assert flags.labels == ["False", "True"] and flags.dataset["label"] == [1, 0]
    with pytest.raises(DataError, match=r"mixed label types \(row 0 is bool, row 1 is int\)"):
        DatasetAdapter.from_lists(["a", "b"], [True, 2])


# -- Hugging Face ClassLabel -------------------------------------------------------------------


def hf(labels, feature):
    features = datasets.Features({"text": datasets.Value("string"), "label": feature})
    texts = [f"t{i}" for i in range(len(labels))]
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def test_class_label_ids_are_decoded_through_their_names():
    # ids index the names: id 1 is "0", id 0 is "1"; a string match would swap them.
    swapped = DatasetAdapter.from_hf(hf([1, 0, 1], datasets.ClassLabel(names=["1", "0"])))
    assert swapped.labels == ["1", "0"]
    assert [swapped.labels[i] for i in swapped.dataset["label"]] == ["0", "1", "0"]
    stars = DatasetAdapter.from_hf(hf([0, 4, 2], datasets.ClassLabel(names=["1", "2", "3", "4", "5"])))
    assert [stars.labels[i] for i in stars.dataset["label"]] == ["1", "5", "3"]  # not shifted by one
    with pytest.raises(DataError, match=r"column 'label', row 1: missing label \(-1\)"):
        DatasetAdapter.from_hf(hf([0, -1], datasets.ClassLabel(names=["a", "b"])))


def test_class_label_splits_map_by_name_to_the_train_labels():
    train = hf([0, 1], datasets.ClassLabel(names=["neg", "pos"]))
    test = hf([0, 0, 1], datasets.ClassLabel(names=["pos", "neg"]))  # same names, other order
    splits = DatasetAdapter.from_hf(datasets.DatasetDict(train=train, test=test))
    assert splits["test"].labels == ["neg", "pos"]
    assert [splits["test"].labels[i] for i in splits["test"].dataset["label"]] == ["pos", "pos", "neg"]


@pytest.mark.parametrize("wrap", [datasets.Sequence, datasets.List, datasets.LargeList])
def test_multilabel_class_label_names_are_kept(wrap):
    data = DatasetAdapter.from_hf(hf([[0, 2], [], [1]], wrap(datasets.ClassLabel(names=["x", "y", "z"]))))
    assert data.task == "multilabel" and data.labels == ["x", "y", "z"]
    assert data.dataset["label"] == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    digits = DatasetAdapter.from_hf(hf([[1], [0, 1]], wrap(datasets.ClassLabel(names=["1", "0"]))))
    assert digits.labels == ["1", "0"] and digits.dataset["label"] == [[0.0, 1.0], [1.0, 1.0]]


# -- numbers with a bad cell --------------------------------------------------------------------


def scores_csv(tmp_path, bad: str, row: int = 17, n: int = 30):
    cells = [f"{0.5 + i / 100:.3f}" for i in range(n)]
    cells[row] = bad
    path = tmp_path / "scores.csv"
    path.write_text("text,score\n" + "".join(f'text {i},"{c}"\n' for i, c in enumerate(cells)))
    return path


@pytest.mark.parametrize("bad", ["n/a", "NaN", "1,5"])
def test_one_bad_cell_in_a_numeric_column_is_refused_naming_row_and_value(tmp_path, bad):
    path = scores_csv(tmp_path, bad)
    with pytest.raises(
        DataError,
        match=rf"scores.csv: column 'score' is numeric except row 17: '{bad}'; fix or drop those rows, "
        r"or pass task='classification' if it is one\.",
    ):
        DatasetAdapter.from_csv(path, label="score")


def test_a_numeric_column_without_its_bad_cells_is_regression(tmp_path):
    """pandas keeps the column as text after the bad rows are dropped: it is still numbers."""
    frame = pd.read_csv(scores_csv(tmp_path, "n/a"), keep_default_na=False)
    frame = frame[frame.score != "n/a"]
    data = DatasetAdapter.from_pandas(frame, label="score")
    assert data.task == "regression" and data.labels is None
    assert data.dataset["label"][:2] == pytest.approx([0.5, 0.51])
    said = DatasetAdapter.from_lists(["a", "b", "c"], ["0.5", "high", "0.7"], task="classification")
    assert said.labels == ["0.5", "0.7", "high"]  # said so: no refusal from the numeric check


def test_a_numeric_column_said_to_be_classification_refuses_its_missing_marker(tmp_path):
    with pytest.raises(DataError, match=r"column 'score', row 17: label 'n/a' reads as a missing value"):
        DatasetAdapter.from_csv(scores_csv(tmp_path, "n/a"), label="score", task="classification")


@settings(max_examples=30, deadline=None)
@given(
    numbers=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=4, max_size=40),
    bad=st.sampled_from(["n/a", "NaN", "1,5", "?", "inf", "none"]),
    data=st.data(),
)
def test_stray_text_in_a_float_column_is_always_named(numbers, bad, data):
    numbers[0] += 0.25 if float(numbers[0]).is_integer() else 0  # at least one fraction
    row = data.draw(st.integers(1, len(numbers) - 1))
    labels = [str(n) for n in numbers]
    labels[row] = bad
    with pytest.raises(DataError, match=rf"is numeric except row {row}: '{bad}'"):
        DatasetAdapter.from_lists([f"t{i}" for i in range(len(labels))], labels)


# -- labels that would silently become classes ---------------------------------------------------


@pytest.mark.parametrize("marker", ["nan", "NA", "None", "null", "N/A", ""])
def test_missing_value_words_are_not_classes(marker):
    labels = ["pos", "neg", marker, "pos", marker]
    with pytest.raises(
        DataError,
        match=rf"lists, column 'label', row 2: label '{marker}' reads as a missing value, not a "
        r"class \(also rows \[4\]\); drop or fill those rows, or pass labels=\[\.\.\.\] naming it",
    ):
        DatasetAdapter.from_lists([f"t{i}" for i in range(5)], labels)
    # Named explicitly, it is a class (North America, say).
    given = DatasetAdapter.from_lists(["a", "b"], ["EU", "NA"], label_names=["EU", "NA"])
    assert given.dataset["label"] == [0, 1]


def test_labels_differing_only_by_spaces_are_refused_naming_both_spellings():
    with pytest.raises(
        DataError,
        match=r"column 'label': labels 'pos' \(row 0\) and ' pos' \(row 2\) differ only by surrounding "
        r"spaces; strip them",
    ):
        DatasetAdapter.from_lists(["a", "b", "c"], ["pos", "neg", " pos"])
    train = DatasetAdapter.from_lists(["a", "b"], ["pos", "neg"])
    with pytest.raises(
        DataError, match=r"label 'neg ' is not one of .* \(it differs from 'neg' by surrounding"
    ):
        DatasetAdapter.from_lists(["c"], ["neg "], label_names=train.labels)


@pytest.mark.parametrize("missing", [pd.NA, np.nan, None])
def test_pandas_na_is_a_missing_label(missing):
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": pd.array(["x", missing, "y"], dtype=object)})
    with pytest.raises(
        DataError, match=r"DataFrame, column 'label', row 1: missing label \((<NA>|nan|None)\)"
    ):
        DatasetAdapter.from_pandas(frame)
    nullable = pd.DataFrame({"text": ["a", "b"], "label": pd.array([1, None], dtype="Int64")})
    with pytest.raises(DataError, match=r"row 1: missing label \(<NA>\)"):
        DatasetAdapter.from_pandas(nullable)


# -- multi-label rows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([["a"], [["b"]]], r"row 1: a list inside the label list \[\['b'\]\]; each row holds a flat list"),
        ([["a"], ["b", 1]], r"mixed label types \(row 0 is str, row 1 is int\)"),
        ([["a"], ["b", None]], r"row 1: missing label \(None\)"),
        ([["a", " b"], ["b"]], r"labels ' b' \(row 0\) and 'b' \(row 1\) differ only by surrounding spaces"),
    ],
)
def test_bad_multilabel_rows_are_refused(labels, message):
    with pytest.raises(DataError, match=message):
        DatasetAdapter.from_lists([f"t{i}" for i in range(len(labels))], labels)


def test_integer_multilabels_map_to_the_values_that_occur():
    data = DatasetAdapter.from_lists(["a", "b"], [[3, 7], [7]])
    assert data.labels == ["3", "7"] and data.dataset["label"] == [[1.0, 1.0], [0.0, 1.0]]
    with pytest.raises(DataError, match=r"row 0: a list of labels \['a'\] in a single-label task"):
        DatasetAdapter.from_lists(["a"], [["a"]], task="classification")


# -- a training set with one class ------------------------------------------------------------------


def test_check_trainable_refuses_a_single_class():
    one = DatasetAdapter.from_lists(["a", "b", "c"], ["pos", "pos", "pos"], label_names=["neg", "pos"])
    with pytest.raises(
        DataError,
        match=r"training data \(lists\) holds one class only, 'pos' \(all 3 examples\); a classifier "
        r"needs examples of at least two",
    ):
        one.check_trainable()
    DatasetAdapter.from_lists(["a", "b"], ["pos", "neg"]).check_trainable()
    DatasetAdapter.from_lists(["a", "b"], [0.5, 0.5]).check_trainable()  # regression: no classes
    _, val = DatasetAdapter.from_lists(list("abcd"), ["x", "y", "x", "y"]).split(2, seed=0)
    val.select([0]).check_compatible(["x", "y"], "classification", "validation")  # one class is fine there
    with pytest.raises(DataError, match=r"training data \(lists\) has no label column"):
        DatasetAdapter.from_lists(["a"]).check_trainable()


def test_multi_hot_vectors_are_read_as_such():
    # MultiLabelBinarizer's rows were read as lists of the names "0" and "1": every row [1, 1].
    rows = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
    data = DatasetAdapter.from_lists(list("abcd"), rows)
    assert data.task == "multilabel" and data.labels == ["0", "1", "2"]
    assert data.dataset["label"] == [[float(v) for v in r] for r in rows]
    named = DatasetAdapter.from_lists(
        list("ab"),
        [np.array([True, False, True]), [0.0, 1.0, 0.0]],
        label_names=["action", "comedy", "drama"],
    )
    assert named.dataset["label"] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    with pytest.raises(DataError, match="0/1 vectors of 3 labels, but 2 label names"):
        DatasetAdapter.from_lists(list("ab"), rows[:2], label_names=["x", "y"])
    # Lists of names stay lists of names, integer names too.
    assert DatasetAdapter.from_lists(list("ab"), [[0, 2], [1]]).dataset["label"] == [
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 0.0],
    ]
