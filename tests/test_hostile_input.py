"""Hostile input: broken files and odd labels fail early with a message that names them; odd texts work.

The second half is property-based (hypothesis): label mapping round-trips, splits partition and
stratify, and loaders yield every example exactly once per epoch, over random data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import sentiment_texts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtune import DataError, DatasetAdapter, FineTuner
from llmtune._batching import BatchLoader, Tokenized
from llmtune._labels import MISSING_WORDS

PROPERTIES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def csv_file(tmp_path, content: str | bytes, name: str = "data.csv"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "text,label,text\nhi,a,x\nyo,b,y\n",
            r"data.csv: the header names column\(s\) \['text'\] more than once",
        ),
        (
            "great film,pos\nawful,neg\n",
            r"no text column 'text'; the columns are \['great film', 'pos'\]\. "
            r"If the first row is data, the file has no header row",
        ),
        ("text;label\nhi;a\n", r"the columns are \['text;label'\]\. .*pass sep=';'"),
        ("text,label\nhi,a,extra\nyo,b\n", r"data.csv: malformed CSV .* check sep=','"),
        ("text,label\nhi,a\nyo,b,extra\n", r"data.csv: malformed CSV .*Expected 2 fields in line 3, saw 3"),
        ("text,label\nhi,a\nyo,\n", r"data.csv, column 'label', row 1: missing label \(nan\)"),
        ('text,label\nhi,a\n"",b\n', r"data.csv, column 'text', row 1: expected text, got nan"),
        ("", r"data.csv: the file is empty"),
        ("text,label\n", r"data.csv: the dataset is empty"),
    ],
)
def test_broken_csv_is_refused_naming_file_and_cause(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        DatasetAdapter.from_csv(csv_file(tmp_path, content))


def test_non_utf8_csv_names_the_file_and_the_encoding_option(tmp_path):
    path = csv_file(tmp_path, "text,label\nna\xefve caf\xe9,1\n".encode("cp1252"), "win.csv")
    with pytest.raises(
        DataError, match=r"win.csv: cannot decode as utf-8 \(.* at line 2, byte 13\); .*encoding='latin-1'"
    ):
        DatasetAdapter.from_csv(path)
    assert DatasetAdapter.from_csv(path, encoding="cp1252").to_list()[0]["text"] == "naïve café"


def test_carriage_returns_inside_texts_survive_a_pandas_round_trip(tmp_path):
    """pandas writes a text holding a bare "\r" unquoted; in a "\n" file it is still one text."""
    import pandas as pd

    texts = ["RT a\rb", "c\r\nd", 'e, "quoted"', "f"]
    pd.DataFrame({"text": texts, "label": ["x", "y", "x", "y"]}).to_csv(tmp_path / "t.csv", index=False)
    assert list(DatasetAdapter.from_csv(tmp_path / "t.csv").dataset["text"]) == texts
    crlf = csv_file(tmp_path, b"text,label\r\nhello,x\r\nbye,y\r\n", "crlf.csv")
    assert DatasetAdapter.from_csv(crlf).to_list() == [
        {"text": "hello", "label": 0},
        {"text": "bye", "label": 1},
    ]


def test_duplicate_column_in_a_dataframe_is_refused():
    import pandas as pd

    frame = pd.DataFrame([["hi", "a", "x"]], columns=["text", "label", "label"])
    with pytest.raises(DataError, match=r"duplicate column names \['label'\]"):
        DatasetAdapter.from_pandas(frame)


def test_csv_text_columns_stay_text_and_labels_keep_their_type(tmp_path):
    """Numbers in a text column are texts; a label column of mixed values is read as strings."""
    path = csv_file(tmp_path, "text,label\n123,1\n4.50,a\n007,2\n")
    data = DatasetAdapter.from_csv(path)
    assert data.dataset["text"] == ["123", "4.50", "007"]
    assert data.labels == ["1", "2", "a"]  # pandas gives strings for a mixed column: three classes
    bools = DatasetAdapter.from_csv(csv_file(tmp_path, "text,label\nx,True\ny,False\n", "b.csv"))
    assert bools.labels == ["False", "True"] and bools.dataset["label"] == [1, 0]
    # Codes written with leading zeros are not numbers: "007" and "7" are two classes.
    codes = DatasetAdapter.from_csv(csv_file(tmp_path, "text,label\na,007\nb,042\nc,7\nd,100\n", "c.csv"))
    assert codes.labels == ["007", "042", "100", "7"] and codes.dataset["label"] == [0, 1, 3, 2]
    ints = DatasetAdapter.from_csv(csv_file(tmp_path, "text,label\na,10\nb,2\nc,-1\n", "i.csv"))
    assert ints.labels == ["-1", "2", "10"]  # ordered as numbers
    floats = DatasetAdapter.from_csv(csv_file(tmp_path, "text,label\na,0.5\nb,2\nc,1e-3\n", "f.csv"))
    assert floats.task == "regression" and floats.dataset["label"] == [0.5, 2.0, 0.001]
    # A stray "?" among star ratings is not a sixth class.
    stars = "text,label\n" + "".join(f"t{i},{i % 5 + 1}\n" for i in range(20)) + "t,?\n"
    with pytest.raises(DataError, match=r"numeric except row 20: '\?'"):
        DatasetAdapter.from_csv(csv_file(tmp_path, stars, "s.csv"))
    assert len(DatasetAdapter.from_csv(csv_file(tmp_path, stars, "s.csv"), task="classification").labels) == 6


RECORDS = [{"text": "a good film", "label": "pos"}, {"text": "dull", "label": "neg"}]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (
            "bom.jsonl",
            b'\xef\xbb\xbf{"text": "a good film", "label": "pos"}\n{"text": "dull", "label": "neg"}\n',
        ),
        ("array.jsonl", json.dumps(RECORDS, indent=2).encode()),
        ("lines.json", b'{"text": "a good film", "label": "pos"}\r\n\n{"text": "dull", "label": "neg"}\r\n'),
        ("columns.json", json.dumps({"text": ["a good film", "dull"], "label": ["pos", "neg"]}).encode()),
        ("bom.json", b"\xef\xbb\xbf" + json.dumps(RECORDS).encode()),
    ],
)
def test_json_is_read_by_its_content_not_its_extension(tmp_path, name, content):
    data = DatasetAdapter.from_json(csv_file(tmp_path, content, name))
    assert data.dataset["text"] == ["a good film", "dull"] and data.labels == ["neg", "pos"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "d.jsonl",
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c" "label": "x"}\n',
            r"d.jsonl, line 3: not valid JSON \(Expecting ',' delimiter, column 14\); from_json reads",
        ),
        (
            "d.json",
            '[{"text": "a", "label": "x"},\n {"text": "b", "label": }]',
            r"d.json, line 2: not valid JSON",
        ),
        (
            "d.jsonl",
            '{"text": "a", "label": "x"}\n["b", "y"]\n',
            r"d.jsonl, line 2: expected a record .*got list",
        ),
        ("d.json", '[{"text": "a", "label": "x"}, "b"]', r"d.json, element 1: expected a record"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r"column 'label', row 1: missing label"),
        ("d.jsonl", "\n \n", r"d.jsonl: the file is empty"),
        (
            "d.jsonl",
            b'{"text": "caf\xe9"}',
            r"cannot decode as utf-8 \(.* at line 1, byte 13\); JSON files are UTF-8",
        ),
    ],
)
def test_broken_json_is_refused_naming_the_line(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        DatasetAdapter.from_json(csv_file(tmp_path, content, name))


def test_integer_column_names_from_a_headerless_file(tmp_path):
    import pandas as pd

    frame = pd.read_csv(csv_file(tmp_path, "great film,pos\nawful,neg\n"), header=None)
    data = DatasetAdapter.from_pandas(frame, text=0, label=1)
    assert data.dataset["text"] == ["great film", "awful"] and data.labels == ["neg", "pos"]
    clash = pd.DataFrame([["a", "b", "x"]], columns=[0, "0", "label"])
    with pytest.raises(DataError, match=r"duplicate column names \['0'\]"):
        DatasetAdapter.from_pandas(clash, text=0)


# -- labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, options, message",
    [
        (["x", 5], {}, r"mixed label types \(row 0 is str, row 1 is int\)"),
        ([True, 1], {}, r"mixed label types \(row 0 is bool, row 1 is int\)"),
        ([0, float("nan")], {}, r"row 1: missing label \(nan\)"),
        (["a", None], {"label_names": ["a", "b"]}, r"row 1: missing label \(None\)"),
        ([0, 2], {"label_names": ["a", "b"]}, r"row 1: label id 2 is out of range for 2 labels \['a', 'b'\]"),
        ([0, -1], {"label_names": ["a", "b"]}, r"row 1: label id -1 is out of range"),
        (["a", "c"], {"label_names": ["a", "b"]}, r"row 1: label 'c' is not one of the labels \['a', 'b'\]"),
        ([0.5, 1.0], {"label_names": ["a", "b"]}, r"row 0: label 0.5 is not one of the labels"),
        ([[], []], {}, r"no label values at all"),
        ([["a"], "b"], {"task": "multilabel"}, r"row 1: expected a list of labels, got 'b'"),
        ([1.0, float("inf")], {}, r"row 1: regression target inf is not finite"),
        ([{"a": 1}, {"b": 2}], {}, r"row 0: unsupported label type dict"),
    ],
)
def test_bad_labels_are_refused_before_training(labels, options, message):
    with pytest.raises(DataError, match=message):
        DatasetAdapter.from_lists([f"t{i}" for i in range(len(labels))], labels, **options)


def test_integer_like_labels_map_consistently():
    assert DatasetAdapter.from_lists(["a", "b"], [0.0, 1.0], label_names=["neg", "pos"]).dataset["label"] == [
        0,
        1,
    ]
    years = DatasetAdapter.from_lists(["a", "b", "c"], [2024, 2023, 2024])
    assert years.labels == ["2023", "2024"]  # sparse codes: two outputs, not 2025
    assert DatasetAdapter.from_lists(["a", "b"], [1, 3]).labels == ["1", "3"]  # only what occurs


# -- texts -----------------------------------------------------------------------------------


def test_empty_and_whitespace_texts_are_valid_examples(make_model, tokenizer):
    """Documented behaviour: from lists, "" is a text (the model sees only [CLS] [SEP])."""
    texts, labels = ["", "   ", "good", "\n\t", "bad", ""], ["pos", "neg", "pos", "neg", "neg", "pos"]
    data = DatasetAdapter.from_lists(texts, labels)
    assert data.tokenize(tokenizer, 32).lengths.tolist() == [2, 2, 3, 2, 3, 2]
    model = make_model()
    FineTuner(model, max_steps=2, batch_size=4, progress=False, precision="fp32").fit(data)
    assert len(model.predict(["", " "])) == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: DatasetAdapter.from_lists("abc", [0, 1, 0]),
            r"lists: texts is one string \('abc'\), not a list",
        ),
        (lambda: DatasetAdapter.from_lists(["a", "b"], "xy"), r"lists: labels is one string \('xy'\)"),
        (
            lambda: DatasetAdapter.from_lists(["a"], ["x"], text_pairs="p"),
            r"lists: text_pairs is one string \('p'\), not a list; pass a list, e.g. \['p'\]",
        ),
        (lambda: DatasetAdapter.from_lists(["a"], ["x"], label_names="xy"), r"label_names is one string"),
        (
            lambda: DatasetAdapter({"text": "abc", "label": [0, 1, 0]}),
            r"dataset: column 'text' is one string",
        ),
    ],
)
def test_a_string_where_a_list_belongs_is_refused(call, message):
    with pytest.raises(DataError, match=message):
        call()


def test_a_lone_surrogate_is_named_at_construction():
    """Such a text cannot be stored or tokenized; the raw UnicodeEncodeError named no row."""
    with pytest.raises(
        DataError, match=r"lists, column 'text_pair', row 1: the text holds '\\ud83d', a lone surrogate"
    ):
        DatasetAdapter.from_lists(["ok", "fine"], [0, 1], text_pairs=["x", "half an emoji \ud83d"])


def test_very_long_texts_are_truncated_not_fatal(make_model, tokenizer):
    long = "good film " * 20_000 + "bad"  # 200k characters; a pair of two took > 20 GB before
    data = DatasetAdapter.from_lists([long, "bad", long], ["pos", "neg", "pos"], text_pairs=["x", long, long])
    assert data.tokenize(tokenizer, 64).lengths.tolist() == [64, 64, 64]
    model = make_model(max_length=64)
    FineTuner(model, max_steps=1, batch_size=3, progress=False, precision="fp32").fit(data)
    assert model.logits([long, "x" * 100_000]).shape == (2, 2)


def test_long_pairs_tokenize_as_the_tokenizer_truncates_them(tokenizer):
    """Cutting long pairs before tokenizing changes no token: longer first, longer second, equal."""
    texts = [" ".join(sentiment_texts(40, seed=s)[0]) for s in range(3)]  # ~300 words each
    firsts, seconds = [texts[0], texts[1], texts[2], "short"], [texts[1][:900], texts[0], texts[2], texts[0]]
    data = DatasetAdapter.from_lists(firsts, [0, 1, 0, 1], text_pairs=seconds)
    for max_length in (32, 61, 128):
        mine = data.tokenize(tokenizer, max_length)
        reference = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
        for i, ids in enumerate(reference["input_ids"]):
            assert mine.input_ids[mine.offsets[i] : mine.offsets[i + 1]].tolist() == ids


def test_long_pairs_keep_their_ends_when_the_tokenizer_truncates_on_the_left(tokenizer):
    """truncation_side="left" keeps the ends of a long pair; cutting them first must not lose them."""
    import copy

    left = copy.deepcopy(tokenizer)
    left.truncation_side = "left"
    firsts = [" ".join(["good"] * 30 + ["awful"] * 10), "short", "the film " * 60]
    seconds = [" ".join(["bad"] * 30 + ["superb"] * 10), "the plot " * 60, "dull " * 50]
    data = DatasetAdapter.from_lists(firsts, [0, 1, 0], text_pairs=seconds)
    for max_length in (16, 32):
        mine = data.tokenize(left, max_length)
        reference = left(firsts, seconds, truncation=True, max_length=max_length)
        for i, ids in enumerate(reference["input_ids"]):
            assert mine.input_ids[mine.offsets[i] : mine.offsets[i + 1]].tolist() == ids


# -- properties ------------------------------------------------------------------------------

# Texts that are classes: no surrounding spaces or missing-value words ("NA"), and no
# fractional numbers ("0.5"), which make a regression column; test_labels.py covers those.
class_names = st.text(max_size=8).filter(
    lambda s: s == s.strip() and s.lower() not in MISSING_WORDS and not _is_fraction(s)
)


def _is_fraction(text: str) -> bool:
    try:
        return not float(text).is_integer()
    except ValueError:
        return False


label_values = st.one_of(
    st.lists(class_names, min_size=1, max_size=40),
    st.lists(st.integers(-5, 120), min_size=1, max_size=40),
    st.lists(st.integers(0, 10**6), min_size=1, max_size=40),
    st.lists(st.booleans(), min_size=1, max_size=40),
)


@PROPERTIES
@given(values=label_values, data=st.data())
def test_label_mapping_round_trips(values, data):
    texts = data.draw(st.lists(st.text(max_size=20), min_size=len(values), max_size=len(values)))
    adapter = DatasetAdapter.from_lists(texts, values)
    ids = list(adapter.dataset["label"])
    assert [adapter.labels[i] for i in ids] == [str(v) for v in values]
    assert list(adapter.dataset["text"]) == texts
    assert len(adapter.labels) == len(set(ids)) == len({str(v) for v in values})  # none invented
    # Any order of the same names, given explicitly, maps every value to its own name.
    names = data.draw(st.permutations(adapter.labels))
    again = DatasetAdapter.from_lists(texts, values, label_names=names)
    assert [again.labels[i] for i in again.dataset["label"]] == [str(v) for v in values]


@PROPERTIES
@given(values=st.lists(st.lists(st.sampled_from("abcde"), max_size=4), min_size=1, max_size=30))
def test_multilabel_mapping_round_trips(values):
    if not any(values):
        values[0] = ["a"]
    adapter = DatasetAdapter.from_lists([f"t{i}" for i in range(len(values))], values)
    assert adapter.task == "multilabel"
    for hot, value in zip(adapter.dataset["label"], values):
        assert {adapter.labels[j] for j, h in enumerate(hot) if h} == set(value)


@PROPERTIES
@given(
    values=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=2, max_size=80),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_split_partitions_and_stratifies(values, fraction, seed):
    data = DatasetAdapter.from_lists([f"t{i}" for i in range(len(values))], values)
    n_val = round(fraction * len(values))
    if not 0 < n_val < len(values):
        with pytest.raises(DataError, match="leaves"):
            data.split(fraction, seed=seed)
        return
    train, val = data.split(fraction, seed=seed)
    texts, val_texts = list(train.dataset["text"]), list(val.dataset["text"])
    assert len(val) == n_val and sorted(texts + val_texts) == sorted(list(data.dataset["text"]))
    assert train.labels == val.labels == data.labels
    counts = np.bincount(data.dataset["label"], minlength=len(data.labels))
    val_counts = np.bincount(val.dataset["label"], minlength=len(data.labels))
    train_counts = counts - val_counts
    if n_val <= (counts - 1).clip(min=0).sum():  # then no class is left out of training
        assert ((val_counts == 0) | (train_counts > 0)).all()
    share = counts * n_val / len(values)
    if (counts >= 2).all() and n_val <= len(values) / 2:  # no cap binds: floor or ceil of the share
        assert (np.abs(val_counts - share) < 1).all()
    assert val_texts == list(data.split(fraction, seed=seed)[1].dataset["text"])  # reproducible


@PROPERTIES
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=120),
    batch_size=st.integers(1, 17),
    shuffle=st.booleans(),
    group_by_length=st.booleans(),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 5),
)
def test_loader_yields_every_example_once_per_epoch(
    lengths, batch_size, shuffle, group_by_length, seed, epoch
):
    rows = [[i] * n for i, n in enumerate(lengths)]  # each token is its example's index
    labels = np.arange(len(lengths), dtype=np.int64)
    data = Tokenized.from_rows(rows, None, labels, pad_id=-1)
    loader = BatchLoader(data, batch_size, shuffle=shuffle, group_by_length=group_by_length, seed=seed)
    loader.set_epoch(epoch)
    seen = []
    for batch in loader:
        assert len(batch["labels"]) <= batch_size
        mask = batch["attention_mask"].bool()
        assert mask.sum(1).tolist() == [lengths[i] for i in batch["labels"].tolist()]
        assert (batch["input_ids"][mask] == batch["labels"].repeat_interleave(mask.sum(1))).all()
        assert (batch["input_ids"][~mask] == -1).all()
        seen += batch["labels"].tolist()
    assert sorted(seen) == list(range(len(lengths)))
    torch.manual_seed(seed + 1)  # the order is a pure function of (seed, epoch), not global RNG
    assert seen == [i for b in loader.batch_indices(epoch) for i in b.tolist()]
