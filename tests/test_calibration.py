"""Calibrated probabilities and tuned thresholds: they lower NLL and ECE, beat 0.5, survive save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sentiment_texts

from llmtune import ClassifierModel, ConfigError, DatasetAdapter, FineTuner, OptimizerFactory
from llmtune import _calibration as C


def test_ece_by_hand():
    # Four predictions with top probability 0.9 (3 right) and two with 0.6 (1 right).
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    targets = np.array([0, 0, 0, 1, 0, 1])
    expected = (4 * abs(0.75 - 0.9) + 2 * abs(0.5 - 0.6)) / 6
    assert C.expected_calibration_error(probs, targets) == pytest.approx(expected)


def test_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 3)) * 2
    targets = np.array([rng.choice(3, p=np.exp(z) / np.exp(z).sum()) for z in true_logits])
    assert C.fit_temperature(true_logits * 3, targets, "classification") == pytest.approx(3.0, rel=0.1)


def test_best_f1_threshold_and_target_thresholds():
    scores = np.array([0.45, 0.40, 0.35, 0.30, 0.20, 0.10, 0.05])
    truth = np.array([1, 1, 1, 0, 1, 0, 0], dtype=bool)
    # score >= 0.20 catches all four positives with one false one: F1 8/9, the best.
    assert C.best_f1_threshold(scores, truth) == pytest.approx((0.20 + 0.10) / 2)
    assert C.target_threshold(scores, truth, "precision", 1.0) == 0.35  # the most recall at precision 1
    assert C.target_threshold(scores, truth, "recall", 0.75) == 0.35  # the most precision at recall .75
    assert C.best_f1_threshold(scores, np.zeros(7, dtype=bool)) == 0.5
    with pytest.raises(ValueError, match="no threshold reaches recall 0.9 .* no positives"):
        C.target_threshold(scores, np.zeros(7, dtype=bool), "recall", 0.9)  # was an IndexError
    # Adjacent float32 scores: their float32 midpoint is one of them, and the cut took in a negative.
    close = np.array([0.7, np.nextafter(np.float32(0.7), np.float32(0), dtype=np.float32), 0.1], np.float32)
    cut = C.best_f1_threshold(close, np.array([True, False, False]))
    assert (close >= cut).tolist() == [True, False, False]


def test_the_recall_rule_takes_the_most_precise_threshold_not_the_highest():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    truth = np.array([1, 0, 1, 1], dtype=bool)
    # >= 0.7: recall 2/3, precision 2/3; >= 0.6: recall 1, precision 3/4 (better at both).
    assert C.target_threshold(scores, truth, "recall", 0.6) == 0.6


@pytest.fixture
def trained(make_model):
    texts, labels = sentiment_texts(200)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.3, seed=0)
    model = make_model(dropout=0.0)
    FineTuner(model, optimizer=OptimizerFactory.adamw(lr=3e-3), epochs=3, batch_size=16, progress=False).fit(
        train
    )
    return model, val


def test_calibration_lowers_nll_and_ece_of_an_overconfident_model(trained):
    model, val = trained
    with torch.no_grad():  # the same argmax, far too sure of itself
        model.head.weight.mul_(50)
        model.head.bias.mul_(50)
    report = model.calibrate(val, precision="fp32")
    assert report["temperature"] > 2
    assert report["nll_after"] < report["nll_before"] and report["ece_after"] < report["ece_before"]
    tuner = FineTuner(model, progress=False, precision="fp32")
    assert tuner.evaluate(val)["ece"] == pytest.approx(report["ece_after"], abs=1e-6)
    texts = list(val.dataset["text"])[:5]
    raw = model.logits(texts)
    np.testing.assert_allclose(
        model.predict_proba(texts), torch.from_numpy(raw / model.temperature).softmax(-1)
    )


def imbalanced_multilabel(make_model, monkeypatch):
    """A model whose rare label always scores below 0.5, yet ranks its positives first."""
    rng = np.random.default_rng(0)
    n = 300
    rare = rng.random(n) < 0.1
    common = rng.random(n) < 0.5
    labels = [[name for name, on in (("rare", r), ("common", c)) if on] for r, c in zip(rare, common)]
    data = DatasetAdapter.from_lists([f"text {i}" for i in range(n)], labels, task="multilabel")
    logits = np.stack(
        [np.where(rare, -0.5, -2.5) + rng.normal(0, 0.3, n),
         np.where(common, 1.0, -1.0) + rng.normal(0, 0.3, n)], 1
    ).astype(np.float32)  # fmt: skip
    order = [data.labels.index("rare"), data.labels.index("common")]
    logits = logits[:, np.argsort(order)]
    model = make_model(labels=data.labels, task="multilabel")
    monkeypatch.setattr(model, "outputs", lambda tokens, *a, **k: logits)
    return model, data, logits


def test_thresholds_beat_one_half_on_an_imbalanced_multilabel_set(make_model, monkeypatch):
    model, data, logits = imbalanced_multilabel(make_model, monkeypatch)
    report = model.calibrate(data)
    rare = data.labels.index("rare")
    assert report["thresholds"][rare] < 0.5
    assert report["f1_after"] > report["f1_before"] + 0.2
    predicted = model.predict([f"text {i}" for i in range(len(data))])
    assert sum("rare" in p for p in predicted) > 0  # at 0.5 it was never predicted


def test_binary_threshold_for_a_target_precision(trained):
    model, val = trained
    report = model.calibrate(val, threshold="precision", target=0.95)
    assert 0 < report["threshold"] < 1 and model.threshold == report["threshold"]
    with pytest.raises(ConfigError, match="is for binary classifiers"):
        model.__class__.calibrate(_multi(model), val, threshold="f1")


def test_a_threshold_given_to_predict_decides_a_binary_model_and_is_refused_where_none_can(trained):
    # It was silently ignored outside multi-label: 0.99 and 0.01 gave the same labels.
    model, val = trained
    texts = list(val.dataset["text"])
    probs = model.predict_proba(texts, precision="fp32")[:, 1]
    for cut in (0.01, 0.5, 0.99):
        expected = [model.labels[int(p >= cut)] for p in probs]
        assert model.predict(texts, threshold=cut, precision="fp32") == expected
    assert set(model.predict(texts, threshold=0.0, precision="fp32")) == {model.labels[1]}
    with pytest.raises(ConfigError, match="not 3 classes"):
        _multi(model).predict(texts, threshold=0.5)
    regression = ClassifierModel(model.encoder, model.tokenizer, task="regression")
    with pytest.raises(ConfigError, match="not a regression model"):
        regression.predict(texts, threshold=0.5)


def _multi(model):
    clone = ClassifierModel(model.encoder, model.tokenizer, labels=["a", "b", "c"])
    return clone


def test_calibration_survives_save_and_load_and_training_resets_it(make_model, monkeypatch, tmp_path):
    model, data, _ = imbalanced_multilabel(make_model, monkeypatch)
    model.calibrate(data)
    model.temperature = 1.7
    model.save_pretrained(tmp_path / "m")
    loaded = ClassifierModel.from_pretrained(tmp_path / "m")
    assert loaded.temperature == 1.7 and loaded.thresholds == model.thresholds
    texts = ["good film", "dull"]
    monkeypatch.undo()
    np.testing.assert_allclose(
        loaded.predict_proba(texts, precision="fp32"), model.predict_proba(texts, precision="fp32")
    )
    texts, labels = sentiment_texts(16)
    names = {"pos": ["common"], "neg": ["rare"]}
    multi = DatasetAdapter.from_lists(texts, [names[y] for y in labels], label_names=loaded.labels)
    FineTuner(loaded, epochs=1, batch_size=8, progress=False).fit(multi)
    assert loaded.temperature == 1.0 and loaded.thresholds is None


@pytest.mark.parametrize("rule", ["precision", "recall"])
def test_a_target_rule_without_its_target_is_refused(trained, rule):
    # Without the target, every threshold "reached" 0.0 and predict called everything positive.
    model, val = trained
    with pytest.raises(ConfigError, match="a target .* goes with threshold='precision' or 'recall'"):
        model.calibrate(val, threshold=rule)
    with pytest.raises(ConfigError, match="only with them"):
        model.calibrate(val, threshold="f1", target=0.9)


def test_reloading_with_another_reading_drops_a_stale_calibration(model_dir, tmp_path, caplog):
    # A temperature is fitted to the outputs of one reading of the texts (max_length, stride,
    # aggregation): max-of-windows logits are larger than their mean, so it must not carry over.
    model = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"], max_length=16, stride=4)
    model.temperature = 2.5
    model.save_pretrained(tmp_path / "m")
    assert ClassifierModel.from_pretrained(tmp_path / "m").temperature == 2.5
    other = ClassifierModel.from_pretrained(tmp_path / "m", aggregation="max")
    assert other.temperature == 1.0 and "calibrate again" in caplog.text
