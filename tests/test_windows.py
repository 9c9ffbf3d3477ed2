"""Long texts as sliding windows: the same rows in training, evaluation and prediction."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, tiny_encoder
from families import FAMILIES, tiny_backbone

from llmtune import ClassifierModel, ConfigError, DatasetAdapter, FineTuner, HeadOnly, OptimizerFactory
from llmtune._tokens import aggregate, encode


def test_windows_are_the_tokenizers_overflow_convention(tokenizer):
    words = [f"{w}" for w in (FILLER * 3)[:30]]
    text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = encode(tokenizer, [text, "good"], None, max_length=12, stride=3)
    # 10 text tokens a window ([CLS] ... [SEP]), each window starting 10 - 3 = 7 after the last.
    expected = [ids[start : start + 10] for start in range(0, len(ids) - 3, 7)]
    assert rows["text"] == [0] * len(expected) + [1]
    assert [r[1:-1] for r in rows["input_ids"][:-1]] == expected
    assert all(r[0] == tokenizer.cls_token_id and r[-1] == tokenizer.sep_token_id for r in rows["input_ids"])
    assert rows["input_ids"][-1] == tokenizer("good")["input_ids"]


def test_aggregation_by_hand():
    rows = np.array([[1.0, 0.0], [3.0, -2.0], [5.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    text = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(aggregate(rows, text, "mean"), [[3.0, -1 / 3], [0.5, 0.5]], rtol=1e-6)
    np.testing.assert_array_equal(aggregate(rows, text, "max"), [[5.0, 1.0], [0.5, 0.5]])
    assert aggregate(rows, None) is rows


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_a_text_that_fits_one_window_gives_exactly_the_same_logits(tokenizer, aggregation):
    encoder = tiny_encoder(tokenizer)
    plain = ClassifierModel(encoder, tokenizer, labels=["a", "b"], max_length=32)
    windows = ClassifierModel(
        encoder, tokenizer, labels=["a", "b"], max_length=32, stride=8, aggregation=aggregation
    )
    texts = ["good film", "the plot was a very dull story", "fine"]
    np.testing.assert_array_equal(
        windows.logits(texts, precision="fp32"), plain.logits(texts, precision="fp32")
    )


def long_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """The sentiment word comes after 40 filler words: truncation at 16 tokens never sees it."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        texts.append(" ".join(rng.choices(FILLER, k=40) + [word] + rng.choices(FILLER, k=rng.randint(0, 6))))
        labels.append(label)
    return texts, labels


def fit(tokenizer, stride, tuning=None, aggregation="mean"):
    texts, labels = long_texts(200)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)
    model = ClassifierModel(
        tiny_encoder(tokenizer, dropout=0.0),
        tokenizer,
        labels=train.labels,
        max_length=16,
        stride=stride,
        aggregation=aggregation,
    )
    if tuning is not None:
        model.tune(tuning)
    tuner = FineTuner(
        model, optimizer=OptimizerFactory.adamw(lr=3e-3), epochs=5, batch_size=16, progress=False
    )
    tuner.fit(train, val)
    return model, tuner, val


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_windows_learn_what_truncation_cannot_see(tokenizer, aggregation):
    model, tuner, val = fit(tokenizer, stride=4, aggregation=aggregation)
    windowed = tuner.evaluate(val)["accuracy"]
    _, plain_tuner, _ = fit(tokenizer, stride=None)
    plain = plain_tuner.evaluate(val)["accuracy"]
    assert windowed >= 0.9 and plain <= 0.7, (windowed, plain)
    texts = list(val.dataset["text"])
    predicted = model.predict(texts)
    assert np.mean([p == model.labels[y] for p, y in zip(predicted, val.dataset["label"])]) == windowed


def test_the_head_only_feature_cache_holds_one_row_per_window(tokenizer):
    model, tuner, val = fit(tokenizer, stride=4, tuning=HeadOnly())
    rows = model.tokenize(val)
    assert len(rows) > 2 * len(val) and rows.text is not None
    assert tuner.evaluate(val)["accuracy"] >= 0.0  # evaluated per text, from the windows' logits
    assert tuner.predict(val).shape == (len(val), 2)


def test_a_100k_token_text_is_read_in_bounded_batches(tokenizer):
    model = ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["a", "b"], max_length=64, stride=8)
    widest = []
    forward = model.forward
    model.forward = lambda *a, **k: (widest.append(k["input_ids"].shape), forward(*a, **k))[1]
    text = " ".join(["good"] * 100_000)
    out = model.logits([text, "fine"], batch_size=32)
    assert out.shape == (2, 2)
    assert max(b for b, _ in widest) <= 32 and max(t for _, t in widest) <= 64
    assert sum(b for b, _ in widest) > 100_000 // 64  # every window was read


def test_windows_survive_save_and_load(tokenizer, tmp_path):
    model = ClassifierModel(
        tiny_encoder(tokenizer), tokenizer, labels=["a", "b"], max_length=16, stride=4, aggregation="max"
    )
    model.save_pretrained(tmp_path / "m")
    loaded = ClassifierModel.from_pretrained(tmp_path / "m")
    assert (loaded.stride, loaded.aggregation) == (4, "max")
    text = [long_texts(1)[0][0]]
    np.testing.assert_array_equal(loaded.logits(text, precision="fp32"), model.logits(text, precision="fp32"))
    assert ClassifierModel.from_pretrained(tmp_path / "m", stride=None).stride == 4  # None keeps the saved
    assert ClassifierModel.from_pretrained(tmp_path / "m", stride=2).stride == 2


@pytest.mark.parametrize(
    ("stride", "aggregation"), [(14, "mean"), (-1, "mean"), (2.5, "mean"), (2, "median")]
)
def test_bad_window_settings_are_refused(tokenizer, stride, aggregation):
    with pytest.raises(ConfigError, match="stride|aggregation"):
        ClassifierModel(
            tiny_encoder(tokenizer),
            tokenizer,
            labels=["a", "b"],
            max_length=16,
            stride=stride,
            aggregation=aggregation,
        )


@pytest.mark.parametrize("max_length", [0, 1, 2])
def test_a_max_length_with_no_room_for_text_is_refused(tokenizer, max_length):
    # 0 and 1 were ignored by the tokenizer (texts ran past the positions: a raw RuntimeError);
    # 2 read every text as [CLS] [SEP], one output for all.
    with pytest.raises(ConfigError, match=f"max_length={max_length} leaves no room for text"):
        ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["a", "b"], max_length=max_length)
    assert (
        ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["a", "b"], max_length=3).max_length == 3
    )


def test_text_pairs_are_windowed_over_the_second_text(tokenizer):
    model = ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["a", "b"], max_length=16, stride=4)
    long = long_texts(1)[0][0]
    rows = encode(tokenizer, ["good film"], [long], 16, 4)
    assert len(rows["text"]) > 2 and set(rows["text"]) == {0}
    assert all(r[:4] == rows["input_ids"][0][:4] for r in rows["input_ids"])  # the first text each time
    assert model.logits(["good film"], [long]).shape == (1, 2)


def test_a_pairs_long_first_text_is_cut_so_the_second_can_be_windowed(tokenizer):
    # The tokenizer alone raises (first text over max_length) or panics (room left <= stride).
    model = ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["a", "b"], max_length=32, stride=8)
    long_first, long_second = long_texts(2)[0]
    first_tokens = len(tokenizer(long_first, add_special_tokens=False)["input_ids"])
    assert first_tokens > 32
    room = 32 - tokenizer.num_special_tokens_to_add(pair=True)
    for first in (long_first, " ".join(long_first.split()[:24])):
        rows = encode(tokenizer, [first], [long_second], 32, 8)
        assert len(rows["text"]) > 2 and all(len(r) <= 32 for r in rows["input_ids"])
        kept = rows["input_ids"][0].index(tokenizer.sep_token_id) - 1
        assert kept == room // 2  # the first text's share of each window
        assert model.logits([first], [long_second]).shape == (1, 2)
    # A pair that fits one window keeps its first text whole, as without stride.
    short = encode(tokenizer, [" ".join(long_first.split()[:20])], ["good"], 64, 8)
    assert (
        short["input_ids"]
        == encode(tokenizer, [" ".join(long_first.split()[:20])], ["good"], 64)["input_ids"]
    )
    with pytest.raises(ConfigError, match="stride=15: windows over the second texts of pairs hold 15"):
        encode(tokenizer, [long_first], [long_second], 32, 15)


@pytest.mark.parametrize("family", FAMILIES)
def test_windows_aggregate_each_window_read_alone_on_every_family(tokenizer, family):
    encoder = tiny_backbone(family, len(tokenizer), tokenizer.pad_token_id).eval()
    windows = ClassifierModel(encoder, tokenizer, labels=["a", "b"], max_length=12, stride=3).eval()
    text = [long_texts(1)[0][0], "good"]  # many windows, and one that fits
    rows = encode(tokenizer, text, None, 12, 3)
    alone = [
        windows(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).detach().numpy()[0]
        for ids in rows["input_ids"]
    ]
    expected = aggregate(np.array(alone), np.array(rows["text"]), "mean")
    np.testing.assert_allclose(windows.logits(text, precision="fp32"), expected, atol=1e-5)
