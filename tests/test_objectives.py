"""Objectives equal their textbook formulas; metrics equal hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmtune import Objective
from llmtune import metrics as M


@pytest.fixture
def logits():
    return torch.randn(16, 4, dtype=torch.float64)


def test_cross_entropy_matches_formula_and_torch(logits):
    targets = torch.randint(0, 4, (16,))
    logp = logits.log_softmax(-1)
    nll = -logp[torch.arange(16), targets]
    assert Objective.cross_entropy()(logits, targets).item() == pytest.approx(nll.mean().item(), rel=1e-6)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    w = weights[targets].double()
    expected = (w * nll).sum() / w.sum()
    got = Objective.cross_entropy(class_weights=weights)(logits, targets)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    eps = 0.1
    smooth = ((1 - eps) * nll + eps * (-logp).mean(-1)).mean()
    got = Objective.cross_entropy(label_smoothing=eps)(logits, targets)
    assert got.item() == pytest.approx(smooth.item(), rel=1e-6)
    reference = torch.nn.CrossEntropyLoss(weight=weights.double(), label_smoothing=eps)(logits, targets)
    got = Objective.cross_entropy(weights, eps)(logits, targets)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)


def test_mse_matches_formula(logits):
    out, targets = logits[:, :1], torch.randn(16, dtype=torch.float64)
    expected = ((out[:, 0] - targets) ** 2).mean()
    assert Objective.mse()(out, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bce_matches_formula(logits):
    targets = (torch.rand(16, 4) > 0.5).double()
    p = logits.sigmoid()
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert Objective.bce()(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)
    pos = torch.tensor([2.0, 1.0, 1.0, 0.5])
    expected = -(pos * targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert Objective.bce(pos_weight=pos)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_objectives_know_their_task_and_metrics():
    assert Objective.for_task("classification").metrics().keys() == {"accuracy", "f1", "ece"}
    assert Objective.for_task("regression").metrics().keys() == {"mse", "mae"}
    assert Objective.for_task("multilabel").metrics().keys() == {"f1", "subset_accuracy"}
    with pytest.raises(ValueError, match="label_smoothing"):
        Objective.cross_entropy(label_smoothing=1.5)


def test_subclass_is_a_drop_in_objective():
    class Focal(Objective):
        task, monitor, mode = "classification", "accuracy", "max"

        def __call__(self, logits, targets):
            logp = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
            return (-((1 - logp.exp()) ** 2) * logp).mean()

        def metrics(self):
            return {"accuracy": M.accuracy}

    loss = Focal()(torch.zeros(2, 2), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(0.25 * np.log(2), rel=1e-6)


def test_metrics_against_hand_computed_values():
    # predictions 0,0,1,2,2,2 against targets 0,1,1,2,2,0
    logits = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    targets = np.array([0, 1, 1, 2, 2, 0])
    assert M.accuracy(logits, targets) == pytest.approx(4 / 6)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp1 fp0 fn1 -> 2/3; class 2: tp2 fp1 fn0 -> 0.8
    assert M.macro_f1(logits, targets) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    multi_logits = np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    multi_targets = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert M.subset_accuracy(multi_logits, multi_targets) == pytest.approx(1 / 3)
    # label 0: tp2 -> f1 1; label 1: tp0 fp1 fn1 -> 0
    assert M.multilabel_f1(multi_logits, multi_targets) == pytest.approx(0.5)
    assert M.mse(np.array([[1.0], [3.0]]), np.array([0.0, 1.0])) == pytest.approx(2.5)
    assert M.mae(np.array([[1.0], [3.0]]), np.array([0.0, 1.0])) == pytest.approx(1.5)


def test_f1_matches_scikit_learn_on_absent_classes_and_random_cases():
    from sklearn.metrics import f1_score

    # Perfect predictions over 5 possible outputs, of which only 0, 1 and 3 occur.
    targets = np.array([0, 1, 3, 3, 1])
    logits = np.eye(5)[targets]
    assert M.macro_f1(logits, targets) == 1.0  # averaging over all 5 outputs gave 0.6
    rng = np.random.default_rng(0)
    for _ in range(50):
        k, n = rng.integers(2, 7), rng.integers(1, 30)
        logits, targets = rng.normal(size=(n, k)), rng.integers(0, k, size=n)
        expected = f1_score(targets, logits.argmax(-1), average="macro", zero_division=0)
        assert M.macro_f1(logits, targets) == pytest.approx(expected)
        multi_targets = (rng.random((n, k)) < 0.3).astype(np.float32)
        expected = f1_score(multi_targets > 0.5, logits > 0, average="macro", zero_division=0)
        assert M.multilabel_f1(logits, multi_targets) == pytest.approx(expected)


def test_weights_and_widths_that_do_not_fit_the_model_are_refused_before_training(make_model, tokenizer):
    # torch raised "weight tensor should be defined either for all 2 classes..." or "The size
    # of tensor a (2) must match..." at the first step, naming no argument.
    from conftest import tiny_encoder

    from llmtune import ClassifierModel, ConfigError, FineTuner

    with pytest.raises(ConfigError, match="class_weights has 3 values but the model has 2 outputs"):
        FineTuner(make_model(), Objective.cross_entropy(class_weights=[1.0, 2.0, 3.0]))
    tags = ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["a", "b", "c"], task="multilabel")
    with pytest.raises(ConfigError, match="pos_weight has 2 values but the model has 3 outputs"):
        FineTuner(tags, Objective.bce(pos_weight=[1.0, 2.0]))
    FineTuner(tags, Objective.bce(pos_weight=[2.0]))  # one value: every label's, as torch broadcasts it
    wide = ClassifierModel(tiny_encoder(tokenizer), tokenizer, task="regression", num_labels=2)
    with pytest.raises(ConfigError, match="a model with 2 outputs for one regression target"):
        FineTuner(wide)  # the loss's reshape failed at the first step
