"""Checkpoints: a SIGKILLed run resumes bit for bit, saves are atomic, loads are safe, NaN stops cleanly."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sentiment_texts, task_data

from llmtune import (
    Callback,
    Checkpoint,
    CheckpointError,
    DatasetAdapter,
    EarlyStopping,
    FineTuner,
    KeepBest,
    Objective,
    OptimizerFactory,
    TrainingError,
)
from llmtune import _checkpoint_format as fmt
from llmtune import checkpoint as ckpt

SCRIPT = Path(__file__).parent / "crash_resume_script.py"


@pytest.fixture
def data():
    texts, labels = sentiment_texts(40)
    return DatasetAdapter.from_lists(texts, labels).split(validation=8, seed=0)


def make_tuner(model, directory=None, **kwargs):
    callbacks = kwargs.pop("callbacks", [])
    if directory is not None:
        callbacks = [Checkpoint(directory, every_n_steps=3, keep_last=None), *callbacks]
    options = dict(epochs=2, batch_size=8, precision="fp32", progress=False, callbacks=callbacks)
    return FineTuner(model, optimizer=OptimizerFactory.adamw(lr=3e-3), **{**options, **kwargs})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def position(path):
    return json.loads((path / ckpt.STATE_FILE).read_text())


# -- exact resume -------------------------------------------------------------------------


def _run(workdir, log, mode, *extra):
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), str(workdir), str(log), mode, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(log):
    return [json.loads(line) for line in Path(log).read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(make_model, tmp_path):
    """A real crash: the subprocess is SIGKILLed after its first checkpoint and resumed from 'latest'."""
    from safetensors.torch import load_file

    unbroken, crashed = tmp_path / "unbroken", tmp_path / "crashed"
    model = make_model()
    for workdir in (unbroken, crashed):
        model.save_pretrained(workdir / "init")
    reference = _run(unbroken, tmp_path / "unbroken.jsonl", "fresh")
    victim = _run(crashed, tmp_path / "before.jsonl", "fresh", "--slow")
    deadline = time.monotonic() + 60
    while ckpt.latest_checkpoint(crashed / "ckpt") is None:
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (crashed / "final.safetensors").exists(), "it finished before the kill"

    resumed_from = position(ckpt.latest_checkpoint(crashed / "ckpt"))
    assert resumed_from["batches_done"] > 0, "the kill should land inside an epoch"
    out, _ = _run(crashed, tmp_path / "after.jsonl", "resume").communicate(timeout=120)
    assert (crashed / "final.safetensors").exists(), out
    out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, out

    assert_same_weights(load_file(unbroken / "final.safetensors"), load_file(crashed / "final.safetensors"))
    assert json.loads((unbroken / "history.json").read_text()) == json.loads(
        (crashed / "history.json").read_text()
    )
    # Same batches (data order) and the same loss at every step (dropout masks, optimizer state).
    step = resumed_from["step"]
    after = _steps(tmp_path / "after.jsonl")
    assert after[0]["step"] == step + 1
    before = [s for s in _steps(tmp_path / "before.jsonl") if s["step"] <= step]
    assert before + after == _steps(tmp_path / "unbroken.jsonl")


def test_resume_from_each_kind_of_checkpoint_matches_an_unbroken_run(make_model, data, tmp_path):
    """In one process: resuming at an epoch's end and inside an epoch, with KeepBest and EarlyStopping."""
    train, val = data  # 32 examples, batch 8: 4 steps per epoch; checkpoints at steps 3, 4, 6, 8
    model = make_model()
    start = weights(model)
    stopper = EarlyStopping("loss", patience=5)
    history = make_tuner(model, tmp_path / "a", epochs=2, callbacks=[stopper]).fit(train, val)
    expected = weights(model)
    found = ckpt.list_checkpoints(tmp_path / "a")
    assert [p.name for p in found] == ["step-00000003", "step-00000004", "step-00000006", "step-00000008"]
    assert [position(p)["batches_done"] for p in found] == [3, 0, 2, 0]  # inside, end, inside, end
    for path in found[:3]:
        model.load_state_dict(start)
        again = make_tuner(
            model, tmp_path / path.name, epochs=2, callbacks=[EarlyStopping("loss", patience=5)]
        )
        assert again.fit(train, val, resume_from=path).records == history.records
        assert_same_weights(weights(model), expected)


def test_callback_state_survives_the_checkpoint_round_trip():
    """What `Checkpoint` saves of each callback is its state_dict; load_state_dict restores it."""
    stop = EarlyStopping("loss", patience=3)
    stop.best, stop.bad_epochs = 0.5, 2
    keep = KeepBest("f1")
    keep.best, keep.best_epoch, keep.weights = 0.9, 1, {"head.weight": torch.arange(4.0)}
    fresh_stop, fresh_keep = EarlyStopping("loss", patience=3), KeepBest("f1")
    fresh_stop.load_state_dict(stop.state_dict())
    fresh_keep.load_state_dict(keep.state_dict())
    assert (fresh_stop.best, fresh_stop.bad_epochs) == (0.5, 2)
    assert (fresh_keep.best, fresh_keep.best_epoch) == (0.9, 1)
    assert torch.equal(fresh_keep.weights["head.weight"], torch.arange(4.0))
    assert Callback().state_dict() == {}


def test_resume_from_a_finished_run_trains_no_more(make_model, data, tmp_path):
    train, val = data
    model = make_model()
    history = make_tuner(model, tmp_path).fit(train, val)
    done = weights(model)
    again = make_tuner(model, tmp_path)
    assert again.fit(train, val, resume_from="latest").records == history.records
    assert again.state.step == history["step"][-1]
    assert_same_weights(weights(model), done)
    # Starting over (or branching from an older checkpoint) in the same directory is refused:
    # the old run's newer checkpoints would win resume_from="latest".
    with pytest.raises(
        CheckpointError, match=r"ahead of this run \(up to step-00000008; this run is at step 0\)"
    ):
        make_tuner(model, tmp_path).fit(train, val)
    with pytest.raises(CheckpointError, match=r"this run is at step 3"):
        make_tuner(model, tmp_path).fit(train, val, resume_from=tmp_path / "step-00000003")


def test_latest_without_checkpoints_starts_fresh_and_without_callback_is_refused(
    make_model, data, tmp_path, caplog
):
    train, _ = data
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        history = make_tuner(make_model(), tmp_path / "empty", epochs=1).fit(train, resume_from="latest")
    assert len(history) == 1 and "starting from scratch" in caplog.text
    with pytest.raises(CheckpointError, match="no Checkpoint callback"):
        make_tuner(make_model()).fit(train, resume_from="latest")
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint .*pass one of them"):
        make_tuner(make_model()).fit(train, resume_from=tmp_path / "empty")


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_latest_without_checkpoints_is_the_same_run_as_a_plain_fit(make_model, tmp_path, task):
    # The first launch of a job that always passes "latest" must get what a fresh start gets:
    # the linear probe of a short run, a regression head started at the targets' mean.
    train, val = task_data(task, 40).split(validation=10, seed=0)

    def run(directory, resume_from):
        torch.manual_seed(0)  # the same random encoder for both
        model = make_model(labels=train.labels or (), task=task)
        tuner = make_tuner(model, directory, epochs=None, min_steps=16, seed=3)
        tuner.fit(train, val, resume_from=resume_from)
        return weights(model), tuner.probe_metrics

    plain, probed = run(tmp_path / "plain", None)
    latest, probed_latest = run(tmp_path / "latest", "latest")
    assert probed is not None and probed_latest == probed
    assert_same_weights(latest, plain)


# -- atomic saves and retention -------------------------------------------------------------


def test_a_failed_save_leaves_the_previous_checkpoint_intact(make_model, data, tmp_path, monkeypatch):
    train, _ = data
    calls = {"n": 0}
    real = fmt.rng_state

    def dies_on_second_save():
        calls["n"] += 1
        if calls["n"] == 2:  # model and optimizer files are already written by now
            raise OSError("disk full")
        return real()

    monkeypatch.setattr(fmt, "rng_state", dies_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        make_tuner(make_model(), tmp_path, epochs=1).fit(train)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]  # no temporary left behind
    model = make_model()
    ckpt.load_weights(model, tmp_path / "step-00000003")


def test_partial_directories_are_never_taken_for_checkpoints(make_model, data, tmp_path):
    """What a SIGKILL during a save or a deletion leaves behind is ignored, then cleaned up."""
    train, _ = data
    model = make_model()
    make_tuner(model, tmp_path, epochs=1).fit(train)
    good = ckpt.latest_checkpoint(tmp_path)
    assert good.name == "step-00000004"
    (tmp_path / ".tmp-step-00000009-123").mkdir()  # killed mid-save
    (tmp_path / ".tmp-step-00000009-123" / ckpt.MODEL_FILE).write_bytes(b"half")
    partial = tmp_path / "step-00000012"  # e.g. copied by hand, a file missing
    partial.mkdir()
    for name in ckpt.FILES[:-1]:
        (partial / name).write_bytes((good / name).read_bytes())
    assert ckpt.latest_checkpoint(tmp_path) == good
    make_tuner(model, tmp_path, epochs=1).fit(train, resume_from="latest")
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_and_best(make_model, data, tmp_path):
    train, val = data
    saver = Checkpoint(tmp_path, keep_last=1, monitor="loss")
    tuner = make_tuner(make_model(), epochs=4, callbacks=[saver], keep_best=False)
    tuner.optimizer = OptimizerFactory.adamw(lr=0.05, schedule="constant")  # overshoots: best is early
    history = tuner.fit(train, val)
    best_epoch = min(range(4), key=lambda e: history["val_loss"][e])
    best = tmp_path / f"step-{history['step'][best_epoch]:08d}"
    last = tmp_path / f"step-{history['step'][-1]:08d}"
    assert set(ckpt.list_checkpoints(tmp_path)) == {best, last}
    assert ckpt.best_checkpoint(tmp_path) == best == saver.best_path
    assert json.loads((tmp_path / "best.json").read_text())["value"] == min(history["val_loss"])


def test_best_is_an_evaluated_checkpoint_and_its_marker_heals_on_resume(make_model, data, tmp_path):
    # The probed head's evaluation (before any step) marked the next mid-epoch save "best",
    # weights nobody had evaluated, labelled with the probe's score.
    train, val = data
    saver = Checkpoint(tmp_path, every_n_steps=2, keep_last=1, monitor="loss")
    tuner = make_tuner(make_model(), epochs=2, probe=True, callbacks=[saver], keep_best=False)
    history = tuner.fit(train, val)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["value"] == min(history["val_loss"])  # an epoch's, not the probe's
    assert best["checkpoint"] in {f"step-{s:08d}" for s in history["step"]}
    # Killed between a best checkpoint and its marker: best.json names an older one.
    (tmp_path / "best.json").write_text(json.dumps({**best, "checkpoint": "step-00000002"}))
    again = Checkpoint(tmp_path, every_n_steps=2, keep_last=1, monitor="loss")
    make_tuner(make_model(), epochs=2, probe=True, callbacks=[again], keep_best=False).fit(
        train, val, resume_from="latest"
    )
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == best["checkpoint"]


def test_checkpoint_records_the_runs_configuration(make_model, data, tmp_path):
    train, _ = data
    make_tuner(make_model(labels=["neg", "pos"]), tmp_path, epochs=1, seed=3).fit(train)
    config = json.loads((ckpt.latest_checkpoint(tmp_path) / ckpt.CONFIG_FILE).read_text())
    assert config["model"]["labels"] == ["neg", "pos"] and config["model"]["task"] == "classification"
    assert config["model"]["encoder"]["hidden_size"] == 32
    assert config["settings"]["seed"] == 3 and config["settings"]["optimizer"]["lr"] == 3e-3
    assert config["data"]["examples"] == len(train)


# -- safe, checked loading --------------------------------------------------------------------


def test_a_checkpoint_of_another_model_or_label_set_is_refused(make_model, data, tmp_path, tokenizer):
    from conftest import tiny_encoder

    from llmtune import ClassifierModel

    train, _ = data
    make_tuner(make_model(labels=["neg", "pos"]), tmp_path, epochs=1).fit(train)
    path = ckpt.latest_checkpoint(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"labels: \['neg', 'pos'\] in the checkpoint, \['a', 'b'\] now"
    ):
        ckpt.load_weights(make_model(labels=["a", "b"]), path)
    three = DatasetAdapter.from_lists(["x", "y", "z"], ["neg", "pos", "meh"])
    with pytest.raises(
        CheckpointError, match=r"labels: \['neg', 'pos'\] in the checkpoint, \['meh', 'neg', 'pos'\]"
    ):
        make_tuner(make_model(labels=three.labels)).fit(three, resume_from=path)
    deeper = ClassifierModel(tiny_encoder(tokenizer, layers=3), tokenizer, labels=["neg", "pos"])
    with pytest.raises(CheckpointError, match=r"num_hidden_layers: 2 in the checkpoint, 3 now"):
        ckpt.load_weights(deeper, path)
    with pytest.raises(CheckpointError, match=r"batch_size: 8 in the checkpoint, 4 now.*data order"):
        make_tuner(make_model(), batch_size=4).fit(train, resume_from=path)
    other = DatasetAdapter.from_lists(*sentiment_texts(40, seed=1))
    with pytest.raises(CheckpointError, match="different training data"):
        make_tuner(make_model()).fit(other, resume_from=path)


def test_loading_never_unpickles_code(make_model, data, tmp_path):
    train, _ = data
    make_tuner(make_model(), tmp_path, epochs=1).fit(train)
    path = ckpt.latest_checkpoint(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state": Payload()}, path / ckpt.OPTIMIZER_FILE)
    with pytest.raises(CheckpointError, match=r"optimizer.pt: cannot read"):
        make_tuner(make_model(), tmp_path).fit(train, resume_from="latest")
    assert not marker.exists()


# -- the NaN / inf guard ----------------------------------------------------------------------


class NaNAt(Objective):
    """Cross-entropy that turns NaN on chosen calls (one call per micro-batch)."""

    task = "classification"

    def __init__(self, bad_calls):
        self.inner, self.bad, self.calls = Objective.cross_entropy(), set(bad_calls), 0

    def __call__(self, logits, targets):
        loss = self.inner(logits, targets)
        self.calls += 1
        return loss * float("nan") if logits.requires_grad and self.calls in self.bad else loss

    def metrics(self):
        return self.inner.metrics()


def test_nan_loss_stops_with_step_and_batch_and_writes_no_poisoned_checkpoint(make_model, data, tmp_path):
    train, _ = data
    model = make_model()
    saver = Checkpoint(tmp_path, every_n_steps=1, keep_last=None)
    tuner = make_tuner(model, callbacks=[saver], grad_accum=2, objective=NaNAt({12}))
    # Micro-batches of 4, 8 per epoch: call 12 is step 6 = epoch 2, batch index 3 (of the window 2-3).
    with pytest.raises(TrainingError, match=r"loss in batch index 3 at step 6 \(epoch 2, batch indices 2-3"):
        tuner.fit(train)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)][-1] == "step-00000005"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_inf_gradient_is_caught_before_the_optimizer_step(make_model, data):
    train, _ = data
    model = make_model()
    model.head.weight.register_hook(lambda g: g * float("inf") if tuner.state.step == 2 else g)
    tuner = make_tuner(model, max_grad_norm=None)
    with pytest.raises(TrainingError, match=r"gradient of \['head.weight'\] .* at step 3 \(epoch 1"):
        tuner.fit(train)
    assert torch.isfinite(model.head.weight).all()


def test_inf_in_the_sparse_word_embedding_gradient_is_named(make_model, data):
    """The CPU fast paths keep this gradient sparse until the step; the guard still sees it."""
    train, _ = data
    model = make_model()
    weight = model.encoder.get_input_embeddings().weight
    weight.register_hook(lambda g: g * float("inf") if tuner.state.step == 1 else g)
    tuner = make_tuner(model)
    with pytest.raises(TrainingError, match=r"gradient of \['encoder.embeddings.word_embeddings.weight'\]"):
        tuner.fit(train)
    assert torch.isfinite(weight).all()


def test_skip_mode_drops_bad_steps_and_counts_them(make_model, data):
    train, _ = data
    tuner = make_tuner(make_model(), objective=NaNAt({2, 7}), nonfinite="skip")
    history = tuner.fit(train)
    assert history["skipped_steps"] == [1, 1]
    assert tuner.state.step == 2 * 4 - 2 and tuner.state.skipped == 2
    assert all(torch.isfinite(torch.tensor(history.train_loss)))


def test_save_refuses_non_finite_weights(make_model, data, tmp_path):
    train, _ = data
    model = make_model()
    tuner = make_tuner(model, tmp_path, epochs=1)
    tuner.fit(train)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(TrainingError, match=r"refusing to write a checkpoint: model weights \['head.bias'\]"):
        ckpt.save_checkpoint(tmp_path / "step-00000099", tuner, tuner.state)
    assert not (tmp_path / "step-00000099").exists()


# -- resuming into a changed run ----------------------------------------------------------------


class Marker(Callback):
    """A callback with state of its own, to stand in front of the others."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def best_first(tuner):
    """KeepBest on a metric that is best in epoch 1: 0, -1, -2, ... by epoch."""
    tuner.metrics["minus_epoch"] = lambda logits, targets: -float(tuner.state.epoch)
    return tuner


@pytest.mark.parametrize("change", ["progress bar on", "callback in front"])
def test_callback_state_finds_its_callback_in_a_changed_list(make_model, data, tmp_path, caplog, change):
    """KeepBest's best epoch is before the checkpoint: lost on resume, the run would end elsewhere."""
    train, val = data
    model = make_model()
    start = weights(model)
    options = dict(epochs=3, keep_best=False)
    keep = KeepBest("minus_epoch", mode="max")
    history = best_first(make_tuner(model, tmp_path / "a", callbacks=[keep], **options)).fit(train, val)
    assert keep.best_epoch == 0
    expected = weights(model)

    model.load_state_dict(start)
    keep = KeepBest("minus_epoch", mode="max")
    if change == "progress bar on":  # the ProgressBar goes first
        again = make_tuner(model, tmp_path / "b", progress=True, callbacks=[keep], **options)
    else:
        callbacks = [Marker(), Checkpoint(tmp_path / "b", every_n_steps=3, keep_last=None), keep]
        again = make_tuner(model, callbacks=callbacks, **options)
    with caplog.at_level(logging.INFO, logger="llmtune"):
        resumed = best_first(again).fit(train, val, resume_from=tmp_path / "a" / "step-00000004")
    assert resumed.records == history.records
    assert keep.best_epoch == 0
    assert_same_weights(weights(model), expected)
    assert "restored the state of callbacks ['Checkpoint #1', 'KeepBest #1']" in caplog.text
    if change == "callback in front":
        assert "['Marker #1'] got no saved state" in caplog.text


def test_callback_states_match_by_class_and_occurrence(caplog):
    from llmtune._resume import match_callbacks

    saved = [
        {"class": "ProgressBar", "state": {}},
        {"class": "KeepBest", "state": {"best": 1.0}},
        {"class": "EarlyStopping", "state": {"best": 0.5}},
        {"class": "KeepBest", "state": {"best": 2.0}},
        {"class": "KeepBest", "state": {"best": 3.0}},
    ]
    first, second, stop = KeepBest("loss"), KeepBest("f1"), EarlyStopping()
    pairs, homeless, starved = match_callbacks(saved, [Marker(), first, stop, second])
    assert [(label, callback, state["best"]) for label, callback, state in pairs] == [
        ("KeepBest #1", first, 1.0),
        ("EarlyStopping #1", stop, 0.5),
        ("KeepBest #2", second, 2.0),  # the second KeepBest gets the second saved KeepBest's state
    ]
    assert homeless == ["KeepBest #3"] and starved == ["Marker #1"]  # ProgressBar's {} is no state


class OptimizerProbe(Callback):
    """Records the optimizer right after a resume (on_fit_start), before any step."""

    def on_fit_start(self, tuner, state, **kwargs):
        groups = state.optimizer.param_groups
        self.lrs = {round(g["lr"], 12) for g in groups}
        self.decay = {g["weight_decay"] for g in groups}
        self.exp_avg = state.optimizer.state[tuner.model.head.weight]["exp_avg"].clone()


def test_a_changed_learning_rate_or_weight_decay_resumes_with_them(make_model, data, tmp_path, caplog):
    """lr 3e-3 == head lr made two groups; lr 5e-4 makes four, weight_decay=0 one: state moves by name."""
    train, _ = data
    make_tuner(make_model(), tmp_path / "a").fit(train)  # linear decay over 8 steps
    path = tmp_path / "a" / "step-00000003"
    saved = torch.load(path / ckpt.OPTIMIZER_FILE, weights_only=True)
    index = {n: i for g in saved["param_groups"] for n, i in zip(g["param_names"], g["params"])}
    for factory, lrs in [
        (OptimizerFactory.adamw(lr=5e-4), {5e-4 * 5 / 8, 1e-3 * 5 / 8}),  # 5 of 8 steps left
        (OptimizerFactory.adamw(lr=3e-3, weight_decay=0.0), {3e-3 * 5 / 8}),
    ]:
        probe = OptimizerProbe()
        tuner = make_tuner(make_model(), tmp_path / f"b{factory.lr}", callbacks=[probe])
        tuner.optimizer = factory
        with caplog.at_level(logging.WARNING, logger="llmtune"):
            tuner.fit(train, resume_from=path)
        assert tuner.state.step == 8
        assert probe.lrs == {round(lr, 12) for lr in lrs}
        assert probe.decay == ({0.0} if factory.weight_decay == 0 else {0.0, 0.01})
        assert torch.equal(probe.exp_avg, saved["state"][index["head.weight"]]["exp_avg"])
        assert "with changed settings: optimizer." in caplog.text


def test_another_optimizer_starts_its_state_fresh(make_model, data, tmp_path, caplog):
    train, _ = data
    make_tuner(make_model(), tmp_path / "a").fit(train)
    tuner = make_tuner(make_model(), tmp_path / "b")
    tuner.optimizer = OptimizerFactory.sgd(lr=3e-3)
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        tuner.fit(train, resume_from=tmp_path / "a" / "step-00000003")
    assert tuner.state.step == 8
    assert "another optimizer (AdamW in the checkpoint, SGD now): its state" in caplog.text
    assert "optimizer.name: 'adamw' in the checkpoint, 'sgd' now" in caplog.text


def test_a_checkpoint_without_parameter_names_resumes_by_position(make_model, data, tmp_path):
    """Checkpoints written before the optimizer state carried names still resume exactly."""
    train, val = data
    model = make_model()
    start = weights(model)
    history = make_tuner(model, tmp_path / "a").fit(train, val)
    expected = weights(model)
    path = tmp_path / "a" / "step-00000003"
    saved = torch.load(path / ckpt.OPTIMIZER_FILE, weights_only=True)
    for group in saved["param_groups"]:
        del group["param_names"]
    torch.save(saved, path / ckpt.OPTIMIZER_FILE)
    model.load_state_dict(start)
    assert make_tuner(model, tmp_path / "b").fit(train, val, resume_from=path).records == history.records
    assert_same_weights(weights(model), expected)


def test_a_changed_tokenizer_fast_cpu_or_dropout_is_named_on_resume(make_model, data, tmp_path, caplog):
    import copy

    train, _ = data
    make_tuner(make_model(), tmp_path / "a").fit(train)
    model = make_model(dropout=0.2)
    model.tokenizer = copy.deepcopy(model.tokenizer)
    model.tokenizer.add_tokens(["zzzunseen"])
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        tuner = make_tuner(model, tmp_path / "b", fast_cpu=False)
        tuner.fit(train, resume_from=tmp_path / "a" / "step-00000003")
    warning = caplog.text
    assert "fast_cpu: True in the checkpoint, False now" in warning
    assert "tokenizer.vocab_sha256:" in warning and "tokenizer.vocab_size:" in warning
    assert "dropout.head: 0.1 in the checkpoint, 0.2 now" in warning
    assert "dropout.encoder.hidden_dropout_prob: 0.1 in the checkpoint, 0.2 now" in warning


# -- damaged and newer checkpoints --------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer):
    """A finished run's directory (checkpoints at steps 3, 4, 6, 8) and the data it trained on."""
    from conftest import tiny_encoder

    from llmtune import ClassifierModel

    torch.manual_seed(0)
    texts, labels = sentiment_texts(40)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=8, seed=0)
    directory = tmp_path_factory.mktemp("finished")
    model = ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["neg", "pos"])
    make_tuner(model, directory).fit(train, val)
    return directory, train


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * (len(raw) // 256 + 1))
    elif path.suffix == ".json":  # readable, but not what the file should hold
        path.write_text(json.dumps({"something": "else"}))
    else:
        torch.save({"something": torch.zeros(3)} if path.name != ckpt.CALLBACKS_FILE else [1, 2], path)


# Other weights with the right names would make another model, refused as such (see above).
DAMAGES = [(n, how) for n in ckpt.FILES for how in ("truncated", "garbage", "wrong content")]


@pytest.mark.parametrize("name, how", [d for d in DAMAGES if d != (ckpt.MODEL_FILE, "wrong content")])
def test_a_damaged_file_is_named_and_the_model_stays_untouched(make_model, finished, tmp_path, name, how):
    import shutil

    directory, train = finished
    path = tmp_path / "step-00000003"
    shutil.copytree(directory / "step-00000003", path)
    _damage(path / name, how)
    model = make_model()
    before = weights(model)
    with pytest.raises(CheckpointError) as caught:
        make_tuner(model, tmp_path / "run").fit(train, resume_from=path)
    assert str(caught.value).startswith(f"{path / name}: cannot read (")
    assert "the checkpoint is damaged" in str(caught.value)
    assert_same_weights(weights(model), before)
    assert not (tmp_path / "run" / ".lock").exists()  # released although fit raised
    if name in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE):  # the files load_weights reads
        with pytest.raises(CheckpointError, match=re.escape(f"{path / name}: cannot read (")):
            ckpt.load_weights(model, path)
        assert_same_weights(weights(model), before)


def test_a_newer_format_is_refused_and_older_ones_read(make_model, finished, tmp_path):
    import shutil

    directory, train = finished
    path = tmp_path / "step-00000003"
    shutil.copytree(directory / "step-00000003", path)
    config = json.loads((path / ckpt.CONFIG_FILE).read_text())
    assert config["format"] == ckpt.FORMAT == 1
    ckpt.load_weights(make_model(), path)  # the current format
    (path / ckpt.CONFIG_FILE).write_text(json.dumps({**config, "format": 2}))
    message = r"format 2, written by a newer llmtune; this version reads formats up to 1\. Upgrade"
    with pytest.raises(CheckpointError, match=message):
        make_tuner(make_model(), tmp_path / "run").fit(train, resume_from=path)
    with pytest.raises(CheckpointError, match=message):
        ckpt.load_weights(make_model(), path)
    # A checkpoint written before tokenizer, dropout and optimizer class were recorded still resumes.
    old = {k: v for k, v in config.items() if k not in ("tokenizer", "dropout", "optimizer_class")}
    old["settings"] = {k: v for k, v in config["settings"].items() if k != "fast_cpu"}
    (path / ckpt.CONFIG_FILE).write_text(json.dumps(old))
    tuner = make_tuner(make_model(), tmp_path / "run")
    tuner.fit(train, resume_from=path)
    assert tuner.state.step == 8


def test_mps_generator_state_is_saved_and_restored(make_model, data, tmp_path, monkeypatch, caplog):
    from llmtune import _checkpoint_format as fmt

    train, _ = data
    tuner = make_tuner(make_model(), epochs=1)
    tuner.fit(train)
    generator = torch.Generator().manual_seed(7).get_state()
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: generator.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    path = ckpt.save_checkpoint(tmp_path / "step-00000004", tuner, tuner.state)
    state = fmt.read_rng(path / ckpt.RNG_FILE)
    assert torch.equal(state["mps"], generator)
    fmt.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], generator)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        fmt.set_rng_state(state)
    assert "has mps RNG state but mps is not available" in caplog.text
