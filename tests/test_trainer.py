"""FineTuner: learning happens, accumulation is exact, events come in order, bad data is refused."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import sentiment_texts, task_data

from llmtune import (
    Callback,
    ConfigError,
    DataError,
    DatasetAdapter,
    EarlyStopping,
    FineTuner,
    HistoryLogger,
    KeepBest,
    Objective,
    OptimizerFactory,
)


@pytest.fixture
def sentiment():
    texts, labels = sentiment_texts(400)
    return DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)


def test_net_learns(make_model, sentiment):
    train, val = sentiment
    model = make_model(labels=train.labels)
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=3e-3),
        epochs=6,
        batch_size=16,
        precision="fp32",
        progress=False,
    )
    before = tuner.evaluate(val)
    history = tuner.fit(train, val)
    after = tuner.evaluate(val)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert before["accuracy"] < 0.75
    assert after["accuracy"] >= 0.95
    assert after["f1"] >= 0.95
    assert len(history) == 6 and history["epoch"] == [1, 2, 3, 4, 5, 6]


def _one_step(model, data, batch_size, grad_accum, max_grad_norm=None, objective=None):
    tuner = FineTuner(
        model,
        objective=objective,
        optimizer=OptimizerFactory.sgd(lr=0.1, momentum=0.0, head_lr=None),
        max_steps=1,
        batch_size=batch_size,
        grad_accum=grad_accum,
        precision="fp32",
        progress=False,
        keep_best=False,
        group_by_length=False,
        max_grad_norm=max_grad_norm,
    )
    tuner.fit(data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "objective",
    [None, Objective.cross_entropy(class_weights=[4.0, 1.0], label_smoothing=0.1)],
    ids=["default", "class-weights"],
)
def test_grad_accumulation_equals_one_big_batch(make_model, objective):
    # Weighted cross-entropy averages over the targets' weights, not the examples: micro-batches
    # with more of the heavy class must count for more, as they would in one big batch.
    texts, labels = sentiment_texts(16)
    labels = ["pos"] * 12 + ["neg"] * 4
    data = DatasetAdapter.from_lists(texts, labels)
    model = make_model(dropout=0.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    big = _one_step(model, data, batch_size=16, grad_accum=1, objective=objective)
    model.load_state_dict(start)
    small = _one_step(model, data, batch_size=16, grad_accum=4, objective=objective)
    changed = [k for k in start if not torch.equal(start[k], big[k])]
    assert changed, "one step of SGD must move the weights"
    for key in big:
        torch.testing.assert_close(small[key], big[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [0.1, 10.0])
def test_clipping_scales_a_large_gradient_and_leaves_a_small_one(make_model, factor):
    texts, labels = sentiment_texts(8)
    data = DatasetAdapter.from_lists(texts, labels)
    model = make_model(dropout=0.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    free = _one_step(model, data, batch_size=8, grad_accum=1)
    update = {k: free[k] - start[k] for k in start}  # -lr * gradient, lr = 0.1
    norm = torch.linalg.vector_norm(torch.stack([u.norm() for u in update.values()])).item() / 0.1
    model.load_state_dict(start)
    clipped = _one_step(model, data, batch_size=8, grad_accum=1, max_grad_norm=factor * norm)
    if factor > 1:  # under the limit the weights move exactly as without clipping
        assert all(torch.equal(clipped[k], free[k]) for k in start)
    coef = min(1.0, factor * norm / (norm + 1e-6))
    for key in start:
        torch.testing.assert_close(clipped[key], start[key] + coef * update[key], rtol=1e-4, atol=1e-7)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, tuner, state, **kwargs):
        self.events.append("fit_start")

    def on_epoch_start(self, tuner, state, **kwargs):
        self.events.append("epoch_start")

    def on_step_end(self, tuner, state, **kwargs):
        self.events.append("step")

    def on_evaluate(self, tuner, state, **kwargs):
        self.events.append("evaluate")

    def on_epoch_end(self, tuner, state, **kwargs):
        self.events.append("epoch_end")

    def on_fit_end(self, tuner, state, **kwargs):
        self.events.append("fit_end")


def test_event_order(make_model):
    texts, labels = sentiment_texts(12)
    train = DatasetAdapter.from_lists(texts, labels)
    recorder = Recorder()
    FineTuner(make_model(), epochs=2, batch_size=4, progress=False, callbacks=[recorder]).fit(train, train)
    epoch = ["epoch_start", "step", "step", "step", "evaluate", "epoch_end"]
    assert recorder.events == ["fit_start", *epoch, *epoch, "fit_end"]


def test_every_callback_accepts_kwargs(make_model):
    from llmtune import callbacks as cb

    for cls in (cb.Callback, cb.ProgressBar, cb.EarlyStopping, cb.KeepBest, cb.HistoryLogger):
        for event in cb.EVENTS:
            params = __import__("inspect").signature(getattr(cls, event)).parameters
            assert any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{cls.__name__}.{event}"


def test_early_stopping_and_history_file(make_model, sentiment, tmp_path):
    train, val = sentiment
    stopper = EarlyStopping("accuracy", patience=1, min_delta=2.0)  # nothing improves by 2.0
    path = tmp_path / "history.jsonl"
    tuner = FineTuner(
        make_model(), epochs=5, batch_size=32, progress=False, callbacks=[stopper, HistoryLogger(path)]
    )
    history = tuner.fit(train, val)
    assert len(history) == 2  # epoch 1 sets the best, epoch 2 fails to improve -> stop
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == history.records
    assert {"epoch", "step", "train_loss", "val_loss", "val_accuracy", "val_f1"} <= set(lines[0])


def test_early_stopping_never_stops_on_an_improvement(make_model, sentiment):
    # patience=0 stopped after every evaluation; with the probe's "epoch 0", before any step.
    train, val = sentiment
    stopper = EarlyStopping("loss", patience=0)
    tuner = FineTuner(make_model(), epochs=2, probe=True, progress=False, callbacks=[stopper])
    tuner.fit(train, val)
    assert tuner.state.step > 0 and len(tuner.state.history) >= 1


def test_the_logged_settings_say_how_the_run_was_planned(make_model, sentiment):
    # epochs=None and probe=None left the logs without what the run did with them.
    from llmtune._card import training_setup

    train, val = sentiment
    tuner = FineTuner(make_model(), progress=False)
    tuner.fit(train, val)  # 10 steps an epoch: min_steps lengthens it, and the probe starts it
    setup = training_setup(tuner, train, val)
    assert setup["min_steps"] == tuner.min_steps and setup["probe"] is None
    assert setup["probed"] is tuner.probed is True
    assert setup["planned_steps"] == tuner.state.total_steps >= 100


def test_keep_best_restores_best_weights(make_model, sentiment):
    train, val = sentiment
    model = make_model()
    # A huge LR wrecks the model after it has learned; the best epoch's weights come back.
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=3e-3, schedule="constant"),
        epochs=4,
        batch_size=16,
        precision="fp32",
        progress=False,
    )
    history = tuner.fit(train, val)
    best = max(history["val_f1"])
    assert tuner.evaluate(val)["f1"] == pytest.approx(best)


def keep_best_sees(keep, tuner, states):
    """Feed KeepBest one evaluation per (logits, targets) state, as fit does; returns its choice."""
    keep.on_fit_start(tuner, tuner_state := SimpleNamespace(epoch=-1, step=0))
    for epoch, (logits, targets) in enumerate(states):
        tuner_state.epoch, tuner_state.step = epoch, epoch
        metrics = {name: tuner.score(name, logits, targets) for name in ("loss", *tuner.metrics)}
        keep.on_evaluate(tuner, tuner_state, metrics=metrics, outputs=(logits, targets))
    return keep.best_epoch


@pytest.mark.parametrize("monitor", ["loss", "f1"])
def test_keep_best_keeps_a_lucky_score_on_few_examples_out_and_real_gains_in(make_model, monitor):
    tuner = FineTuner(make_model(), progress=False)
    rng = np.random.default_rng(0)

    def states(n, *flips):
        """States on n rows, each right on `flips` more rows than the one before."""
        targets = rng.integers(0, 2, n)
        predicted = [np.where(rng.random(n) < 0.7, targets, 1 - targets)]  # right on ~70%
        for k in flips:
            wrong = np.flatnonzero(predicted[-1] != targets)[:k]
            predicted.append(predicted[-1].copy())
            predicted[-1][wrong] = targets[wrong]
        return [(np.eye(2, dtype=np.float32)[p] * 2 - 1, targets) for p in predicted]

    confident = KeepBest(monitor, confidence=0.95)
    # One lucky row of 24 scores better, but not on 95% of the resamples; 60 rows of 1,000 do.
    assert keep_best_sees(confident, tuner, states(24, 1)) == 0
    assert keep_best_sees(confident, tuner, states(1000, 60)) == 1
    assert keep_best_sees(KeepBest(monitor), tuner, states(24, 1)) == 1  # the default: any gain
    # Two more rows right is no convincing gain over epoch 2, but it is over the first state:
    # judged against the first, steady small gains add up (against the kept one, they would not).
    assert keep_best_sees(confident, tuner, states(1000, 60, 2)) == 2


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
def test_keep_best_with_confidence_in_fit_restores_its_choice_and_checkpoints_its_reference(make_model, task):
    train, val = task_data(task).split(validation=0.5, seed=0)
    torch.manual_seed(0)
    model = make_model(labels=train.labels or ("neg", "pos"), task=task)
    keep = KeepBest(confidence=0.95)
    tuner = FineTuner(model, epochs=3, precision="fp32", progress=False, callbacks=[keep])
    tuner.fit(train, val)
    logits, targets = keep.reference  # the first state's validation outputs, one row per text
    assert len(logits) == len(targets) == len(val)
    assert tuner.evaluate(val)[keep.monitor] == pytest.approx(keep.best, rel=1e-5)  # the kept state
    buffer = io.BytesIO()
    torch.save(keep.state_dict(), buffer)
    buffer.seek(0)
    again = KeepBest(confidence=0.95)
    again.load_state_dict(torch.load(buffer, weights_only=True))  # as a checkpoint is read back
    np.testing.assert_array_equal(again.reference[0], logits)
    np.testing.assert_array_equal(again.reference[1], targets)


@pytest.mark.parametrize(
    "monitor, mode",
    [("ece", "min"), ("mae", "min"), ("mse", "min"), ("val_loss", "min"), ("f1", "max"), ("accuracy", "max")],
)
def test_a_monitor_left_on_auto_knows_which_way_is_better(make_model, monitor, mode):
    # A calibration error is an error: "max" would keep the worst-calibrated epoch.
    tuner = FineTuner(make_model(), progress=False, metrics={monitor: lambda logits, targets: 0.0})
    for callback in (KeepBest(monitor=monitor), EarlyStopping(monitor=monitor)):
        callback.on_fit_start(tuner, None)
        assert callback.mode == mode
    from llmtune.search import _resolve

    assert _resolve(monitor, "auto", None)[1] == {"min": "minimize", "max": "maximize"}[mode]


def test_a_second_fit_without_validation_keeps_its_own_weights(make_model, sentiment):
    # KeepBest held the first fit's best weights and restored them at the second fit's end.
    train, val = sentiment
    model = make_model(labels=train.labels)
    tuner = FineTuner(model, epochs=1, progress=False, optimizer=OptimizerFactory.adamw(lr=3e-3))
    tuner.fit(train, val)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner.epochs = 2  # ends at another epoch than the first fit's best (epoch 1 of 1)
    tuner.fit(train)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_keep_best_rejects_a_confidence_of_one_or_more():
    with pytest.raises(ValueError, match="confidence must be in"):
        KeepBest(confidence=1.0)


def test_user_metric_and_predict_order(make_model, sentiment):
    train, val = sentiment
    tuner = FineTuner(make_model(), epochs=1, progress=False, metrics={"n": lambda logits, y: float(len(y))})
    assert tuner.evaluate(val)["n"] == len(val)
    logits = tuner.predict(val)
    assert logits.shape == (len(val), 2)
    one_by_one = np.concatenate([tuner.predict(val.select([i])) for i in range(5)])
    np.testing.assert_allclose(logits[:5], one_by_one, atol=1e-2)


def test_regression_learns(make_model):
    texts, _ = sentiment_texts(300)
    targets = [float(sum(w in t.split() for w in ("good", "great", "superb"))) + 0.5 for t in texts]
    train, val = DatasetAdapter.from_lists(texts, targets).split(0.2, seed=1)
    model = make_model(task="regression")
    tuner = FineTuner(
        model,
        Objective.mse(),
        OptimizerFactory.adamw(lr=3e-3),
        epochs=8,
        batch_size=16,
        precision="fp32",
        progress=False,
    )
    before = tuner.evaluate(val)["mse"]
    tuner.fit(train, val)
    after = tuner.evaluate(val)
    assert after["mse"] < 0.3 * before and after["mae"] < 0.5


def test_refuses_bad_data_before_training(make_model):
    model = make_model(labels=["neg", "pos"])
    tuner = FineTuner(model, progress=False)
    three = DatasetAdapter.from_lists(["a", "b", "c"], ["neg", "pos", "meh"])
    with pytest.raises(ConfigError, match=r"labels \['meh', 'neg', 'pos'\].*model has \['neg', 'pos'\]"):
        tuner.fit(three)
    train = DatasetAdapter.from_lists(["a", "b"], ["neg", "neg"], label_names=["neg", "pos"])
    val = DatasetAdapter.from_lists(["c", "d"], ["pos", "neg"], label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"\['pos'\] occur in validation .* never in training"):
        tuner.fit(train, val)
    with pytest.raises(ConfigError, match="is for regression but the model is classification"):
        FineTuner(model, Objective.mse())
    for steps in (0, -5):  # 0 ran a whole default run, -5 none
        with pytest.raises(ConfigError, match=f"max_steps must be >= 1 or None, got {steps}"):
            FineTuner(model, max_steps=steps)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_evaluate_refuses_data_with_another_label_mapping(make_model):
    # Ids are positions in the label list: a test set built alone from only "pos" texts maps
    # pos to 0, the model's "neg", and would score a perfect model at 0% without this check.
    model = make_model(labels=["neg", "pos"])
    tuner = FineTuner(model, progress=False)
    only_pos = DatasetAdapter.from_lists(["a", "b"], ["pos", "pos"])
    with pytest.raises(ConfigError, match=r"evaluation data .* has labels \['pos'\] but the model has"):
        tuner.evaluate(only_pos)
    with pytest.raises(ConfigError, match="evaluation data is regression but the model is classification"):
        tuner.evaluate(DatasetAdapter.from_lists(["a", "b"], [0.5, 1.5]))
    with pytest.raises(DataError, match="has no label column"):
        tuner.evaluate(DatasetAdapter.from_lists(["a", "b"]))
    same = DatasetAdapter.from_lists(["a", "b"], ["pos", "pos"], label_names=model.labels)
    assert set(tuner.evaluate(same)) >= {"loss", "accuracy"}


def test_default_epochs_give_small_data_at_least_min_steps(make_model, caplog):
    texts, labels = sentiment_texts(40)  # 2 batches of 32: 3 epochs would be 6 steps
    data = DatasetAdapter.from_lists(texts, labels)
    tuner = FineTuner(make_model(), min_steps=20, progress=False, keep_best=False)
    with caplog.at_level("INFO", logger="llmtune"):
        history = tuner.fit(data)
    assert tuner.state.step == 20 and len(history) == 10
    assert "fewer than min_steps=20: training 10 epochs" in caplog.text

    explicit = FineTuner(make_model(), epochs=3, min_steps=20, progress=False, keep_best=False)
    explicit.fit(data)
    assert explicit.state.step == 6  # an explicit epochs is kept
    big = DatasetAdapter.from_lists(*sentiment_texts(320))  # 10 batches: 3 epochs are 30 steps
    large = FineTuner(make_model(), min_steps=20, progress=False, keep_best=False)
    large.fit(big)
    assert large.state.step == 30
    with pytest.raises(ConfigError, match="min_steps"):
        FineTuner(make_model(), min_steps=-1)


@pytest.mark.parametrize("multiple", [1, 8])
def test_fit_pads_batches_to_the_devices_multiple(make_model, monkeypatch, multiple):
    """On CUDA widths are rounded up to 8 (fewer shapes for cuDNN attention to plan), simulated
    here through the device query; on the CPU each batch keeps its own longest row."""
    monkeypatch.setattr("llmtune._runtime.pad_multiple", lambda device: multiple)
    texts, labels = sentiment_texts(96)
    train = DatasetAdapter.from_lists(texts, labels)
    model = make_model(labels=train.labels)
    widths = []
    model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    FineTuner(model, epochs=1, batch_size=8, progress=False, probe=False).fit(train)
    longest = int(train.tokenize(model.tokenizer, model.max_length).lengths.max())
    rounded = [w % 8 == 0 or w == longest for w in widths]
    assert len(widths) == 12
    assert all(rounded) if multiple == 8 else not all(rounded)


def test_the_progress_bar_of_a_run_resumed_inside_an_epoch_counts_its_done_steps():
    from llmtune import ProgressBar

    bar = ProgressBar()
    state = SimpleNamespace(step=3, epoch=0, steps_per_epoch=9)
    bar.on_epoch_start(SimpleNamespace(is_main=True), state)
    assert (bar.bar.n, bar.bar.total) == (3, 9)  # was 0 of 9, ending at 6 of 9
    bar.bar.close()


@pytest.mark.parametrize("callback", [EarlyStopping("val_f1"), KeepBest("f2")], ids=repr)
def test_a_monitored_name_that_no_evaluation_gives_is_refused_before_training(make_model, callback):
    # It raised at the first evaluation, after a whole epoch of training.
    texts, labels = sentiment_texts(32)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)
    tuner = FineTuner(
        make_model(), epochs=1, batch_size=8, progress=False, callbacks=[callback], keep_best=False
    )
    with pytest.raises(KeyError, match="not among the validation metrics"):
        tuner.fit(train, val)
    assert tuner.state.step == 0
