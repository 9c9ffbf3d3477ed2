"""Hyperparameter search with Optuna on tiny models: it finds the better learning rate, the
pruner stops a clearly worse trial early, and head-only trials encode their data once."""

from __future__ import annotations

import pytest
from conftest import sentiment_texts

from llmtune import ClassifierModel, ConfigError, DatasetAdapter, FineTuner, HeadOnly, OptimizerFactory
from llmtune.search import FeatureCache, Settings, default_space, search

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def splits():
    texts, labels = sentiment_texts(240)
    return DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)


def lr_build(make_model, epochs=4):
    def build(trial):
        lr = trial.suggest_categorical("lr", [1e-6, 3e-3])
        optimizer = OptimizerFactory.adamw(lr=lr, head_lr=None)  # the head at the same rate: lr decides
        return FineTuner(
            make_model(dropout=0.0), optimizer=optimizer, epochs=epochs, batch_size=16, progress=False
        )

    return build


def test_the_search_finds_the_learning_rate_that_learns(make_model, splits):
    train, val = splits
    sampler = optuna.samplers.GridSampler({"lr": [1e-6, 3e-3]}, seed=0)
    result = search(
        lr_build(make_model), train, val, n_trials=2, sampler=sampler, pruner=optuna.pruners.NopPruner()
    )
    assert result.metric == "f1" and result.direction == "maximize"
    assert result.best_params == {"lr": 3e-3}
    assert result.best_value > 0.9
    worse = next(t for t in result.study.trials if t.params["lr"] == 1e-6)
    assert worse.value < 0.7
    # The best trial's tuner comes back trained: its model scores what the trial reported.
    assert result.best_tuner.evaluate(val)["f1"] == pytest.approx(result.best_value)


def test_the_pruner_stops_a_clearly_worse_trial_early(make_model, splits):
    train, val = splits
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.enqueue_trial({"lr": 3e-3})
    study.enqueue_trial({"lr": 1e-6})
    result = search(lr_build(make_model), train, val, n_trials=2, study=study)
    good, bad = result.study.trials
    assert good.state == optuna.trial.TrialState.COMPLETE and len(good.user_attrs["history"]) == 4
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert len(bad.user_attrs["history"]) < 4 and len(bad.intermediate_values) < 4
    assert result.best_params == {"lr": 3e-3}


def test_twenty_head_only_trials_run_the_encoder_once(model_dir, splits):
    train, val = splits
    forwards: list[int] = []

    def build(trial):
        model = ClassifierModel.from_pretrained(model_dir, labels=train.labels, max_length=32)
        forwards.append(0)
        model.encoder.register_forward_hook(lambda *args: forwards.__setitem__(-1, forwards[-1] + 1))
        optimizer = OptimizerFactory.adamw(head_lr=trial.suggest_float("head_lr", 1e-4, 1e-1, log=True))
        return FineTuner(model.tune(HeadOnly()), optimizer=optimizer, epochs=2, progress=False)

    cache = FeatureCache()
    result = search(build, train, val, n_trials=20, feature_cache=cache)
    assert len(forwards) == 20
    assert forwards[0] > 0 and forwards[1:] == [0] * 19  # the first trial's training and validation pass
    assert cache.misses == len(train) + len(val)
    # Cached features give the results an uncached fit gets.
    best = result.study.best_trial
    uncached = build(optuna.trial.FixedTrial(best.params))
    expected = [r["val_f1"] for r in best.user_attrs["history"]]
    assert uncached.fit(train, val)["val_f1"] == pytest.approx(expected)


def test_default_space_builds_each_strategy(model_dir, make_model):
    fixed = {"head_lr": 1e-3, "weight_decay": 0.05, "warmup": 0.1, "epochs": 2, "batch_size": 16}
    head = default_space(optuna.trial.FixedTrial({**fixed, "strategy": "HeadOnly"}))
    assert head == Settings(HeadOnly(), 5e-5, 1e-3, 0.05, 0.1, 2, 16)
    top = default_space(
        optuna.trial.FixedTrial({**fixed, "strategy": "TopLayers", "top_layers": 1, "lr": 2e-5})
    )
    tuner = top.tuner(make_model(), progress=False)
    assert type(tuner.model.tuning).__name__ == "TopLayers" and tuner.model.tuning.k == 1
    assert tuner.optimizer.lr == 2e-5 and tuner.optimizer.head_lr == 1e-3 and tuner.epochs == 2
    pytest.importorskip("peft")
    params = {**fixed, "strategy": "LoRA", "lora_r": 4, "lora_alpha_ratio": 2, "lr": 5e-4}
    lora = default_space(optuna.trial.FixedTrial(params))
    assert (lora.strategy.r, lora.strategy.alpha, lora.strategy.targets) == (4, 8, None)


def test_a_metric_the_tuner_does_not_report_is_refused(make_model, splits):
    train, val = splits
    with pytest.raises(ConfigError, match="not among the validation metrics"):
        search(lr_build(make_model, epochs=1), train, val, n_trials=1, metric="auc")


def test_best_value_is_what_the_returned_model_scores_with_the_probe_and_another_metric(make_model, splits):
    # Default epochs on small data start with the probed head, evaluated as "epoch 0" (step 0);
    # a metric other than the objective's monitor ranks the epochs KeepBest chooses from.
    train, val = splits
    sampler = optuna.samplers.GridSampler({"lr": [1e-6, 3e-3]}, seed=0)
    for metric in ("f1", "loss"):
        result = search(
            lr_build(make_model, epochs=None), train, val, n_trials=2, metric=metric, sampler=sampler
        )
        assert 0 in result.study.best_trial.intermediate_values  # the probe's report
        assert result.best_tuner.evaluate(val)[metric] == pytest.approx(result.best_value, abs=1e-6)


def test_a_continued_study_returns_no_tuner_for_a_best_trial_of_an_earlier_call(make_model, splits):
    train, val = splits
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    study.enqueue_trial({"lr": 3e-3})
    first = search(lr_build(make_model, epochs=2), train, val, n_trials=1, study=study)
    assert first.best_tuner is not None
    study.enqueue_trial({"lr": 1e-6})
    second = search(lr_build(make_model, epochs=2), train, val, n_trials=1, study=study)
    assert second.best_params == {"lr": 3e-3} and second.best_tuner is None
