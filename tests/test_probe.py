"""Linear probing before fine-tuning (`FineTuner(probe=True)`): the head starts from the
regularised fit on frozen features, for every objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sentiment_texts, task_data
from families import FAMILIES, tiny_backbone
from torch import nn

from llmtune import Callback, DatasetAdapter, FineTuner, Objective
from llmtune._probe import STRENGTHS, fit_head
from llmtune.tuning import FeatureLoader


def separable(n=240, features=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    truth = torch.randn(classes, features, generator=generator)
    return x, (x @ truth.T).argmax(1)


def test_the_probe_separates_separable_classes():
    x, y = separable()
    head = nn.Linear(8, 3)
    strength = fit_head(head, Objective.cross_entropy(), x[:160], y[:160])
    assert strength in STRENGTHS
    with torch.no_grad():
        accuracy = (head(x[160:]).argmax(1) == y[160:]).float().mean().item()
    assert accuracy >= 0.9


def test_one_training_example_is_probed_without_folds(make_model):
    # torch.cat of no folds crashed fit on a one-example regression set (a smoke test).
    x, y = torch.randn(1, 8), torch.tensor([[0.5]])
    assert fit_head(nn.Linear(8, 1), Objective.mse(), x, y) == STRENGTHS[0]  # the strongest, alone
    val = (torch.randn(4, 8), torch.randn(4, 1))
    assert fit_head(nn.Linear(8, 1), Objective.mse(), x, y, validation=val) in STRENGTHS
    one = DatasetAdapter.from_lists(["good film"], [0.5])
    FineTuner(make_model(task="regression"), progress=False).fit(one)


def test_more_noise_chooses_a_stronger_penalty():
    x, y = separable(n=60)
    clean = fit_head(nn.Linear(8, 3), Objective.cross_entropy(), x, y)
    noisy = y.clone()
    noisy[torch.randperm(60, generator=torch.Generator().manual_seed(1))[:30]] = torch.randint(0, 3, (30,))
    assert fit_head(nn.Linear(8, 3), Objective.cross_entropy(), x, noisy) >= clean


def test_validation_data_take_part_in_choosing_the_penalty():
    x, y = separable(n=60)
    loss = Objective.cross_entropy()
    alone = fit_head(nn.Linear(8, 3), loss, x, y)
    # Validation rows the training data get wrong: the more confident the fit, the worse.
    xv, yv = separable(n=200, seed=5)
    shuffled = yv[torch.randperm(200, generator=torch.Generator().manual_seed(2))]
    assert fit_head(nn.Linear(8, 3), loss, x, y, validation=(xv, shuffled)) > alone
    # ... and the head is still fitted to the training rows only: same strength, same head.
    a, b = nn.Linear(8, 3), nn.Linear(8, 3)
    fit_head(a, loss, x, y, strengths=(0.01,), validation=(xv, shuffled))
    fit_head(b, loss, x, y, strengths=(0.01,))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


@pytest.mark.parametrize("objective", ["bce", "mse"])
def test_the_probe_lowers_the_loss_of_every_objective(objective):
    x, y = separable()
    if objective == "bce":
        loss, targets, outputs = Objective.bce(), nn.functional.one_hot(y, 3).float(), 3
    else:
        loss, targets, outputs = Objective.mse(), (x[:, :1] * 2 + 1), 1
    head = nn.Linear(8, outputs)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    before = loss(head(x), targets).item()
    fit_head(head, loss, x, targets)
    assert loss(head(x), targets).item() < 0.5 * before


def test_fit_starts_from_the_probe_head(make_model):
    texts, labels = sentiment_texts(64)
    data = DatasetAdapter.from_lists(texts, labels)
    started = {}

    class Record(Callback):
        def on_fit_start(self, tuner, state, **kwargs):
            started["head"] = tuner.model.head.weight.detach().clone()

    torch.manual_seed(0)
    tuner = FineTuner(
        make_model(), probe=True, epochs=1, precision="fp32", progress=False, callbacks=[Record()]
    )
    tuner.fit(data)

    torch.manual_seed(0)
    reference = make_model()  # the same encoder and head before training
    loader = data.loader(reference.tokenizer, batch_size=32, max_length=reference.max_length)
    features = FeatureLoader.build(reference, loader, torch.device("cpu"))
    fit_head(reference.head, Objective.cross_entropy(), features.features, torch.from_numpy(features.labels))
    torch.testing.assert_close(started["head"], reference.head.weight, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    assert not np.allclose(started["head"].numpy(), make_model().head.weight.detach().numpy())


@pytest.fixture
def fit_head_calls(monkeypatch):
    """Every call of `_probe.fit_head` during the test, as (args, kwargs)."""
    from llmtune import _probe

    calls, fit = [], _probe.fit_head
    monkeypatch.setattr(_probe, "fit_head", lambda *a, **k: calls.append((a, k)) or fit(*a, **k))
    return calls


def test_a_small_default_run_probes_and_can_keep_the_probed_head(make_model, caplog, fit_head_calls):
    texts, labels = sentiment_texts(48)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.5, seed=0)
    torch.manual_seed(0)
    tuner = FineTuner(make_model(), min_steps=4, precision="fp32", progress=False)
    with caplog.at_level("INFO", logger="llmtune"):
        tuner.fit(train, val)
    assert tuner.probe_metrics is not None and "epoch 0 (the probed head)" in caplog.text
    features, targets = fit_head_calls[0][1]["validation"]  # the validation rows help choose the penalty
    assert len(features) == len(targets) == len(val)
    keep = next(c for c in tuner.callbacks if type(c).__name__ == "KeepBest")
    assert keep.best_epoch >= -1

    explicit = FineTuner(make_model(), epochs=1, progress=False)  # an explicit epochs: no probe
    explicit.fit(train, val)
    assert explicit.probe_metrics is None


def test_keep_best_restores_the_probed_head_when_training_only_hurts(make_model):
    texts, labels = sentiment_texts(64)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.5, seed=0)
    torch.manual_seed(0)
    model = make_model()
    # A learning rate that wrecks the model: every epoch scores worse than the probe.
    from llmtune import OptimizerFactory

    tuner = FineTuner(
        model, optimizer=OptimizerFactory.sgd(lr=50.0), probe=True, epochs=2, precision="fp32", progress=False
    )
    tuner.fit(train, val)
    keep = next(c for c in tuner.callbacks if type(c).__name__ == "KeepBest")
    assert keep.best_epoch == -1
    assert tuner.evaluate(val)["loss"] == pytest.approx(tuner.probe_metrics["loss"], rel=1e-5)


class Bag(nn.Module):
    """A model of its own: FineTuner needs only forward, tokenizer, labels, task, max_length."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer, self.labels = tokenizer, ["neg", "pos"]
        self.task, self.max_length = "classification", 32
        self.embed = nn.EmbeddingBag(len(tokenizer), 2, mode="sum")

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_):
        return self.embed(input_ids, per_sample_weights=attention_mask.float())


def test_a_model_without_head_trains_by_default_and_refuses_an_explicit_probe(tokenizer):
    from llmtune import ConfigError

    data = DatasetAdapter.from_lists(*sentiment_texts(40))
    tuner = FineTuner(Bag(tokenizer), progress=False, keep_best=False)
    tuner.fit(data)  # a small default run: probing is skipped, not failed
    assert tuner.state.step == 100 and tuner.probe_metrics is None
    with pytest.raises(ConfigError, match="probe=True needs a model with a linear `head`"):
        FineTuner(Bag(tokenizer), probe=True, progress=False).fit(data)


def test_a_windowed_model_probes_on_every_window_of_train_and_validation(make_model, fit_head_calls):
    texts, labels = sentiment_texts(32)
    long = [" ".join([text] * 6) for text in texts]  # several windows each at max_length 16
    train, val = DatasetAdapter.from_lists(long, labels).split(validation=0.5, seed=0)
    model = make_model(max_length=16, stride=4)
    FineTuner(model, probe=True, epochs=1, precision="fp32", progress=False).fit(train, val)
    (_, _, features, targets), options = fit_head_calls[0]
    windows = lambda data: len(data.tokenize(model.tokenizer, 16, 4))  # noqa: E731
    assert len(features) == len(targets) == windows(train) > len(train)
    assert len(options["validation"][0]) == windows(val) > len(val)


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_task_probes_with_its_validation_data(family, task, tokenizer, fit_head_calls):
    from llmtune import ClassifierModel

    train, val = task_data(task).split(validation=0.5, seed=0)
    labels = None if task == "regression" else train.labels
    torch.manual_seed(0)
    model = ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=labels, task=task)
    tuner = FineTuner(model, precision="fp32", progress=False)
    tuner.probe_head(train.loader(tokenizer, batch_size=8, max_length=model.max_length), val)
    (head, loss, features, targets), options = fit_head_calls[0]
    assert features.shape == (len(train), model.head.in_features) and len(targets) == len(train)
    assert len(options["validation"][0]) == len(options["validation"][1]) == len(val)
    # The penalised optimum fits the training rows better than a head that outputs zeros.
    with torch.no_grad():
        zeros = torch.zeros(len(features), head.out_features)
        assert loss(head(features.float()), targets) < loss(zeros, targets)


class BiasAtStart(Callback):
    def on_fit_start(self, tuner, state, **kwargs):
        self.bias = tuner.model.head.bias.detach().clone()


def offset_regression(n: int = 64) -> DatasetAdapter:
    """Targets near 50: a zero-bias head would need the whole run to get there."""
    texts, names = sentiment_texts(n)
    return DatasetAdapter.from_lists(texts, [50.0 + (name == "pos") for name in names], task="regression")


def test_a_new_regression_head_starts_at_the_targets_mean_and_learns_from_there(make_model):
    from llmtune import HeadOnly, OptimizerFactory

    data = offset_regression()
    targets = np.asarray(data.dataset["label"])
    start = BiasAtStart()
    model = make_model(task="regression").tune(HeadOnly())
    tuner = FineTuner(model, epochs=3, batch_size=16, probe=False, progress=False, callbacks=[start],
                      optimizer=OptimizerFactory.adamw(lr=1e-3))  # fmt: skip
    tuner.fit(data)
    assert start.bias.item() == pytest.approx(targets.mean(), abs=1e-4)
    # 12 Adam steps of 1e-3 from a zero bias would leave predictions near 0 (MSE about 2,500).
    assert tuner.evaluate(data)["mse"] < 1.0
    # A head that has been trained keeps its bias in the next fit.
    trained = model.head.bias.detach().clone()
    again = BiasAtStart()
    FineTuner(model, epochs=1, probe=False, progress=False, callbacks=[again]).fit(data)
    torch.testing.assert_close(again.bias, trained)


@pytest.mark.parametrize("task", ["classification", "multilabel"])
def test_other_tasks_keep_a_zero_bias_at_the_start(make_model, task):
    data = task_data(task)
    start = BiasAtStart()
    model = make_model(labels=data.labels, task=task)
    FineTuner(model, epochs=1, probe=False, progress=False, callbacks=[start]).fit(data)
    assert not start.bias.any()
