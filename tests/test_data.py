"""DatasetAdapter: sources agree, labels map, splits stratify, batches pad and group by length."""

from __future__ import annotations

import dataclasses
import json

import datasets
import numpy as np
import pandas as pd
import pytest

from llmtune import DataError, DatasetAdapter
from llmtune._batching import length_grouped_order

TEXTS = ["a good film", "bad", "so so", "great fun here", "awful", "fine", "dull plot", "lovely"]
LABELS = ["pos", "neg", "neu", "pos", "neg", "neu", "neg", "pos"]


def sources(tmp_path):
    frame = pd.DataFrame({"review": TEXTS, "sentiment": LABELS, "other": range(len(TEXTS))})
    csv = tmp_path / "d.csv"
    frame.to_csv(csv, index=False)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(frame.to_dict("records")))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    kw = {"text": "review", "label": "sentiment"}
    return {
        "lists": DatasetAdapter.from_lists(TEXTS, LABELS),
        "pandas": DatasetAdapter.from_pandas(frame, **kw),
        "csv": DatasetAdapter.from_csv(csv, **kw),
        "json": DatasetAdapter.from_json(js, **kw),
        "jsonl": DatasetAdapter.from_json(jsonl, **kw),
        "hf": DatasetAdapter.from_hf(datasets.Dataset.from_pandas(frame), **kw),
        "hf_dict": DatasetAdapter.from_hf(
            datasets.DatasetDict(train=datasets.Dataset.from_pandas(frame)), **kw
        )["train"],
    }


def test_every_source_gives_the_same_examples(tmp_path):
    adapters = sources(tmp_path)
    reference = adapters.pop("lists")
    assert reference.labels == ["neg", "neu", "pos"]
    assert [e["label"] for e in reference.to_list()] == [2, 0, 1, 2, 0, 1, 0, 2]
    for name, adapter in adapters.items():
        assert adapter.to_list() == reference.to_list(), name
        assert adapter.labels == reference.labels, name
        assert adapter.task == "classification", name


def test_text_pairs():
    data = DatasetAdapter.from_lists(["q1", "q2"], [1, 0], text_pairs=["p1", "p2"])
    assert data.has_pairs and data.to_list()[0] == {"text": "q1", "text_pair": "p1", "label": 1}


def test_label_kinds():
    ints = DatasetAdapter.from_lists(["a", "b", "c"], [0, 2, 2])
    assert ints.labels == ["0", "2"] and ints.dataset["label"] == [0, 1, 1]  # no class "1" invented
    named_ids = DatasetAdapter.from_lists(["a", "b"], [1, 0], label_names=["neg", "pos"])
    assert named_ids.dataset["label"] == [1, 0]
    reg = DatasetAdapter.from_lists(["a", "b"], [0.5, 2.0])
    assert reg.task == "regression" and reg.labels is None and reg.num_labels == 1
    multi = DatasetAdapter.from_lists(["a", "b"], [["x", "z"], []])
    assert multi.task == "multilabel" and multi.labels == ["x", "z"]
    assert multi.dataset["label"] == [[1.0, 1.0], [0.0, 0.0]]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])}
    )
    hf = DatasetAdapter.from_hf(
        datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 1]}, features=features)
    )
    assert hf.labels == ["no", "yes"] and hf.dataset["label"] == [1, 1]


def test_datasetdict_splits_share_the_train_mapping():
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["x", "y", "z"]}),
        test=datasets.Dataset.from_dict({"text": ["d"], "label": ["z"]}),
    )
    splits = DatasetAdapter.from_hf(dd)
    assert splits["test"].labels == ["x", "y", "z"] and splits["test"].dataset["label"] == [2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"texts": ["a"], "labels": ["x"], "label_names": ["y"]},
            r"row 0: label 'x' is not one of the labels \['y'\]",
        ),
        (
            {"texts": ["a"], "labels": [5], "label_names": ["n", "p"]},
            r"row 0: label id 5 is out of range for 2 labels",
        ),
        ({"texts": ["a", "b"], "labels": ["x", 1]}, r"mixed label types \(row 0 is str, row 1 is int\)"),
        ({"texts": ["a", "b"], "labels": ["x", None]}, r"row 1: missing label \(None\)"),
        ({"texts": ["a", "b"], "labels": [1.0, float("nan")]}, r"row 1: missing label \(nan\)"),
        (
            {"texts": ["a", "b"], "labels": ["x", "y"], "task": "regression"},
            r"row 0: regression target 'x' is not a number",
        ),
        ({"texts": ["a", None], "labels": [1, 0]}, r"column 'text', row 1: expected text, got None"),
        ({"texts": [], "labels": []}, r"the dataset is empty"),
        ({"texts": ["a"], "labels": [1, 2]}, r"1 texts but 2 labels"),
    ],
)
def test_bad_input_is_refused_with_a_message_that_names_it(kwargs, message):
    with pytest.raises(DataError, match=message):
        DatasetAdapter.from_lists(kwargs.pop("texts"), kwargs.pop("labels"), **kwargs)


def test_missing_column_names_the_columns_present(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\nnice,5\n")
    with pytest.raises(
        DataError, match=r"reviews.csv: no label column 'sentiment'; the columns are \['review', 'stars'\]"
    ):
        DatasetAdapter.from_csv(path, text="review", label="sentiment")


def test_undecodable_csv_names_file_and_encoding_option(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: cannot decode as utf-8 .* encoding='latin-1'"):
        DatasetAdapter.from_csv(path)
    assert DatasetAdapter.from_csv(path, encoding="latin-1").to_list()[0]["text"] == "café"


def test_split_is_stratified_disjoint_and_reproducible():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    data = DatasetAdapter.from_lists([f"t{i}" for i in range(100)], labels)
    train, val = data.split(validation=0.2, seed=3)
    assert len(train) == 80 and len(val) == 20
    assert np.bincount(val.dataset["label"]).tolist() == [12, 6, 2]
    assert set(train.dataset["text"]).isdisjoint(val.dataset["text"])
    assert train.labels == val.labels == data.labels
    again = data.split(validation=0.2, seed=3)[1]
    other = data.split(validation=0.2, seed=4)[1]
    assert again.dataset["text"] == val.dataset["text"] != other.dataset["text"]
    with pytest.raises(DataError, match="leaves 0 of 100"):
        data.split(validation=0.001)
    # numpy's floats are fractions too (np.float32(0.2) was read as the count 0), its ints counts.
    assert [len(s) for s in data.split(validation=np.float32(0.2))] == [80, 20]
    assert [len(s) for s in data.split(validation=np.int64(7))] == [93, 7]


def test_dynamic_padding(tokenizer):
    data = DatasetAdapter.from_lists(
        ["good", "the film was good and the plot was fine", "bad film"], [1, 0, 0]
    )
    tokenized = data.tokenize(tokenizer, max_length=64)
    assert data.tokenize(tokenizer, max_length=64) is tokenized  # tokenized once
    batch = tokenized.collate(np.array([0, 2]))
    lengths = tokenized.lengths[[0, 2]]
    assert batch["input_ids"].shape == (2, lengths.max())  # the longest in this batch, not overall
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    row = batch["input_ids"][0]
    assert row[: lengths[0]].tolist() == tokenizer("good")["input_ids"]
    assert (row[lengths[0] :] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [1, 0]
    short = data.tokenize(tokenizer, max_length=4)
    assert short.lengths.max() == 4


def test_padding_to_a_multiple_stops_at_the_longest_row(tokenizer):
    data = DatasetAdapter.from_lists(
        ["good", "the film was good and the plot was fine", "bad film"], [1, 0, 0]
    )
    tokenized = data.tokenize(tokenizer, max_length=64)  # lengths 3, 11, 4
    short = tokenized.collate(np.array([0, 2]), multiple=8)
    assert short["input_ids"].shape == (2, 8)
    assert short["attention_mask"].sum(1).tolist() == [3, 4]
    assert (short["input_ids"][:, 4:] == tokenizer.pad_token_id).all()
    # 16 would pass the longest row (11): positions past what the model takes are never made.
    assert tokenized.collate(np.array([0, 1]), multiple=8)["input_ids"].shape == (2, 11)
    left = dataclasses.replace(tokenized, pad_left=True).collate(np.array([0, 2]), multiple=8)
    assert left["attention_mask"][:, -3:].all() and not left["attention_mask"][:, :4].any()
    assert left["input_ids"][0, -3:].tolist() == tokenizer("good")["input_ids"]


def test_length_grouped_batches_pad_less_and_are_reproducible():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 200, size=1000)
    batches = length_grouped_order(lengths, 16, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    grouped = sum(len(b) * lengths[b].max() for b in batches)
    order = rng.permutation(1000)
    plain = sum(16 * lengths[order[i : i + 16]].max() for i in range(0, 1000, 16))
    assert grouped < 0.7 * plain
    again = length_grouped_order(lengths, 16, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = length_grouped_order(lengths, 16, np.random.default_rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    # Groups come in random order, not longest first.
    firsts = [lengths[b].max() for b in batches]
    assert firsts != sorted(firsts, reverse=True)


def test_loader_epochs_differ_and_ranks_partition(tokenizer):
    data = DatasetAdapter.from_lists([f"word {'x ' * i}" for i in range(40)], [i % 2 for i in range(40)])
    loader = data.loader(tokenizer, batch_size=4, shuffle=True, group_by_length=True, seed=7)
    e0, e1 = loader.batch_indices(0), loader.batch_indices(1)
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]
    ranks = [
        data.loader(tokenizer, batch_size=4, group_by_length=True, seed=7, rank=r, world_size=2)
        for r in (0, 1)
    ]
    seen = [np.concatenate(r.batch_indices(0)) for r in ranks]
    assert set(seen[0]).isdisjoint(seen[1]) and len(seen[0]) + len(seen[1]) == 40


@pytest.mark.parametrize("n", [57, 58, 61, 3])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_trains_once_an_epoch_on_any_number_of_ranks(tokenizer, n, grouped):
    # A last global batch of fewer examples than ranks was dropped: 1 of 57 unseen each epoch.
    data = DatasetAdapter.from_lists([f"word {'x ' * (i % 9)}" for i in range(n)], [i % 2 for i in range(n)])
    for world in (1, 2, 3):
        for epoch in (0, 1):
            loaders = [
                data.loader(
                    tokenizer, batch_size=4, shuffle=True, group_by_length=grouped, rank=r, world_size=world
                )
                for r in range(world)
            ]
            shares = [loader.batch_indices(epoch) for loader in loaders]
            assert len({len(s) for s in shares}) == 1  # every rank takes the same number of steps
            assert all(len(b) >= 1 for s in shares for b in s)
            seen = np.sort(np.concatenate([np.concatenate(s) for s in shares]))
            assert seen.tolist() == list(range(n))


# -- text the vocabulary cannot read ---------------------------------------------------------

CHINESE = ["质量很好物超所值", "太差了完全不能用", "书的内容一般", "非常满意下次再来"]


def test_unknown_share_counts_text_tokens_only(tokenizer):
    from llmtune._tokens import unknown_share

    def share(texts):
        return unknown_share(np.concatenate(tokenizer(texts)["input_ids"]), tokenizer)

    english = ["good movie great plot", "bad awful boring"]
    assert share(english) == 0.0
    assert share(CHINESE) == 1.0  # [CLS] and [SEP] are not text: with them it would be < 1
    # The fixture's WordPiece training splits English differently run to run: count, don't assume.
    pieces = sum(len(ids) for ids in tokenizer(english, add_special_tokens=False)["input_ids"])
    assert share(english + CHINESE[:1]) == pytest.approx(8 / (pieces + 8))  # 8 characters, 8 [UNK]


def test_unknown_share_is_none_where_it_cannot_be_told(tokenizer):
    import copy

    from llmtune._tokens import unknown_share

    ids = np.concatenate(tokenizer(CHINESE)["input_ids"])
    gpt2_like = copy.deepcopy(tokenizer)
    gpt2_like.sep_token = gpt2_like.unk_token  # an unknown token the tokenizer also adds itself
    assert unknown_share(ids, gpt2_like) is None
    byte_level = copy.deepcopy(tokenizer)
    byte_level.unk_token = None
    assert unknown_share(ids, byte_level) is None
    assert unknown_share(np.array([2, 3]), tokenizer) is None  # special tokens only


def test_fit_warns_before_training_when_the_vocabulary_cannot_read_the_text(make_model, caplog):
    import logging

    from llmtune import FineTuner

    unreadable = DatasetAdapter.from_lists(CHINESE * 4, ["pos", "neg"] * 8, source="reviews")
    readable = DatasetAdapter.from_lists(["good movie", "bad movie"] * 8, ["pos", "neg"] * 8)
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        FineTuner(make_model(), max_steps=1, progress=False).fit(readable)
    assert "unknown token" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="llmtune"):  # by default it grows the vocabulary
        FineTuner(make_model(), max_steps=1, progress=False, extend_vocabulary=False).fit(unreadable)
    assert "100% of the tokens of reviews are the unknown token '[UNK]'" in caplog.text
    assert "multilingual" in caplog.text


def test_tokenized_rows_are_cached_per_vocabulary_and_truncation_side(tokenizer):
    # Two vocabularies grown from one base to the same size shared the cache key: the second
    # model read the first one's ids.
    import copy

    data = DatasetAdapter.from_lists(["the film 很好", "太差 plot"], ["pos", "neg"])
    a, b = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    a.add_tokens(["很", "好"])
    b.add_tokens(["太", "差"])
    assert len(a) == len(b)

    def first_row(data, tok, max_length=16):
        rows = data.tokenize(tok, max_length)
        return rows.input_ids[rows.offsets[0] : rows.offsets[1]].tolist()

    for tok in (a, b):
        assert first_row(data, tok) == tok(data.dataset["text"][0])["input_ids"]
    left = copy.deepcopy(tokenizer)
    left.truncation_side = "left"
    long = DatasetAdapter.from_lists(["good " + "dull " * 30 + "awful"], ["neg"])
    assert first_row(long, tokenizer, 8) != first_row(long, left, 8)
