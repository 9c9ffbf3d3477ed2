"""The experiment loggers, read back with each tracker's own reader: TensorBoard's event
accumulator and MLflow's client. Values, not only files: the loss at each logged step is the
one on_step_end saw, the validation metrics are the history's, a resumed fit continues the
same run without repeating a step, and rank 1 writes nothing."""

from __future__ import annotations

import math

import pytest
from conftest import sentiment_texts

from llmtune import (
    Callback,
    Checkpoint,
    ConfigError,
    DatasetAdapter,
    FineTuner,
    HeadOnly,
    MLflowLogger,
    OptimizerFactory,
    TensorBoardLogger,
)

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def data():
    texts, labels = sentiment_texts(96)
    return DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)


class Losses(Callback):
    """What on_step_end saw: step -> loss."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def on_step_end(self, tuner, state, *, loss, **kwargs):
        self.seen[state.step] = loss.item()


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, tuner, state, **kwargs):
        if state.step == self.step:
            raise RuntimeError("simulated crash")


def tuner_with(model, *callbacks, epochs=3):
    factory = OptimizerFactory.adamw(lr=1e-3, warmup=2)
    return FineTuner(
        model, optimizer=factory, epochs=epochs, batch_size=8, progress=False, callbacks=callbacks
    )


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events, [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_logs_the_losses_metrics_and_settings_it_saw(make_model, tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    train, val = data()
    losses, logger = Losses(), TensorBoardLogger(tmp_path / "tb", log_every=2)
    history = tuner_with(make_model(), losses, logger).fit(train, val)
    assert logger.run_dir == tmp_path / "tb" / "version_0"
    events, loss = scalars(logger.run_dir, "train/loss")
    assert [s for s, _ in loss] == [s for s in sorted(losses.seen) if s % 2 == 0]
    for step, value in loss:  # TensorBoard stores float32
        assert value == pytest.approx(losses.seen[step], rel=1e-6)
    _, accuracy = scalars(logger.run_dir, "val/accuracy")
    assert accuracy == [(r["step"], pytest.approx(r["val_accuracy"], rel=1e-6)) for r in history.records]
    _, lr = scalars(logger.run_dir, "train/lr")
    assert lr[0][1] == pytest.approx(1e-3)  # warmup of 2 steps is over by step 2
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert hparams["epochs"].number_value == 3 and hparams["batch_size"].number_value == 8
    assert hparams["strategy"].string_value == "Full"
    assert hparams["data.train_examples"].number_value == len(train)
    # A second fit is a second run.
    tuner_with(make_model(), TensorBoardLogger(tmp_path / "tb"), epochs=1).fit(train, val)
    assert (tmp_path / "tb" / "version_1").is_dir()


def test_mlflow_logs_params_and_metric_values_to_a_local_store(make_model, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    train, val = data()
    model = make_model().tune(HeadOnly())
    losses, logger = Losses(), MLflowLogger(experiment="tests", run_name="head", log_every=3)
    history = tuner_with(model, losses, logger).fit(train, val)
    assert logger.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"  # MLflow's default, made absolute
    client = MlflowClient(logger.tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "head"
    params = run.data.params
    assert params["strategy"] == "HeadOnly" and float(params["optimizer.lr"]) == 1e-3
    assert params["model.labels"] == "['neg', 'pos']" and params["precision"] in ("fp32", "bf16")
    loss = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "train/loss")]
    assert loss == [(s, losses.seen[s]) for s in sorted(losses.seen) if s % 3 == 0]  # float64: exact
    assert "train/lr" not in run.data.metrics  # HeadOnly: the head is the only group
    f1 = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "val/f1")]
    assert f1 == [(r["step"], r["val_f1"]) for r in history.records]
    logger.log_model(model)
    files = {f.path for f in client.list_artifacts(logger.run_id, "model")}
    assert {"model/llmtune_head.json", "model/README.md"} <= files


def test_a_resumed_fit_continues_the_same_runs_without_repeating_a_step(make_model, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    train, val = data()  # 72 examples, batch 8: 9 steps an epoch, 27 in all

    def run(*extra):
        tb, ml = TensorBoardLogger(tmp_path / "tb", log_every=1), MLflowLogger(log_every=1)
        ckpt = Checkpoint(tmp_path / "ckpt", every_n_steps=5, every_epoch=False)
        tuner = tuner_with(make_model(), tb, ml, ckpt, *extra)
        return tuner, tb, ml

    tuner, tb, ml = run(CrashAt(13))
    with pytest.raises(RuntimeError, match="simulated crash"):
        tuner.fit(train, val)
    client = MlflowClient(ml.tracking_uri)
    assert client.get_run(ml.run_id).info.status == "FAILED"
    first_run = ml.run_id
    tuner, tb, ml = run()
    history = tuner.fit(train, val, resume_from="latest")  # from step 10
    assert ml.run_id == first_run and tb.run_dir == tmp_path / "tb" / "version_0"
    assert client.get_run(ml.run_id).info.status == "FINISHED"
    [experiment] = [e for e in client.search_experiments() if e.name == "llmtune"]
    assert len(client.search_runs([experiment.experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(ml.run_id, "train/loss")]
    assert steps == list(range(1, 28))  # 11-13 logged before the crash, not again
    _, loss = scalars(tb.run_dir, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 28))  # TensorBoard purged the crashed 11-13
    _, f1 = scalars(tb.run_dir, "val/f1")
    assert [s for s, _ in f1] == [r["step"] for r in history.records] == [9, 18, 27]
    assert all(math.isfinite(v) for _, v in loss)


def test_only_rank_0_writes(make_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(FineTuner, "is_main", property(lambda self: False))
    train, val = data()
    tb, ml = TensorBoardLogger(tmp_path / "tb"), MLflowLogger()
    tuner_with(make_model(), tb, ml, epochs=1).fit(train, val)
    assert list(tmp_path.iterdir()) == []
    assert ml.run_id is None and tb.run is None
    ml.log_model(tmp_path)  # nothing to do on rank 1
    assert list(tmp_path.iterdir()) == []


def test_log_model_before_any_fit_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no run to log to"):
        MLflowLogger(f"sqlite:///{tmp_path}/mlflow.db").log_model(tmp_path)


def test_log_every_must_be_positive():
    with pytest.raises(ValueError, match="log_every"):
        TensorBoardLogger("runs", log_every=0)


def test_a_grown_vocabulary_does_not_pass_its_rows_lr_off_as_the_encoders(make_model):
    # The new rows train at the head's LR, in one group with head.bias.
    from llmtune import OptimizerFactory
    from llmtune.loggers.base import learning_rates

    model = make_model()
    assert model.extend_vocabulary(["the film 很好", "真差 plot", "很好看", "太差了"] * 3)
    optimizer, _ = OptimizerFactory.adamw(lr=5e-5, head_lr=1e-3).build(model, 10)
    assert learning_rates(optimizer) == {"train/lr": 5e-5, "train/head_lr": 1e-3}
