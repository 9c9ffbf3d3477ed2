"""Faults injected for real: SIGKILL while saving, a full disk, two runs on one checkpoint directory.

docs/reliability.md has the table of faults and what each leaves behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sentiment_texts
from test_checkpoint import assert_same_weights, make_tuner, weights

from llmtune import Callback, CheckpointError, ClassifierModel, ConfigError, DatasetAdapter, LoRA
from llmtune import checkpoint as ckpt

HERE = Path(__file__).parent
TEXTS = sentiment_texts(8, seed=5)[0]
forking = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


@pytest.fixture
def data():
    texts, labels = sentiment_texts(40)
    return DatasetAdapter.from_lists(texts, labels).split(validation=8, seed=0)


def run_script(*args: str, timeout: float = 180) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, str(HERE / "fault_script.py"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".trash-")))


# -- SIGKILL at random moments ----------------------------------------------------------------


@forking
def test_sigkill_during_save_pretrained_leaves_exactly_the_old_or_the_new_model(model_dir, tmp_path):
    """A (full model) and B (LoRA adapter + head) saved in turn into one directory, killed 8 times."""
    a = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"])
    b = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"]).tune(LoRA(r=2))
    with torch.no_grad():
        for name, p in b.named_parameters():
            if "lora_B" in name or name.startswith("head"):
                p.normal_()
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    a.save_pretrained(tmp_path / "target")
    expected = {name: ClassifierModel.from_pretrained(tmp_path / name).logits(TEXTS) for name in "ab"}
    assert not np.array_equal(expected["a"], expected["b"])

    run_script("save_pretrained", str(tmp_path), "8", "0")
    found = []
    for snapshot in sorted((tmp_path / "snapshots").iterdir(), key=lambda p: int(p.name)):
        assert not (snapshot / "MISSING").exists(), f"kill {snapshot.name} left no directory"
        logits = ClassifierModel.from_pretrained(snapshot).logits(TEXTS)
        same = [name for name, value in expected.items() if np.array_equal(logits, value)]
        assert len(same) == 1, f"kill {snapshot.name} left a directory that is neither A nor B"
        found += same
    assert len(found) == 8
    # What the killed savers left beside the directory goes with the next save.
    a.save_pretrained(tmp_path / "target")
    assert leftovers(tmp_path) == []


@forking
def test_sigkill_during_checkpoint_saves_leaves_complete_checkpoints(make_model, data, tmp_path):
    train, _ = data
    make_model().save_pretrained(tmp_path / "init")
    run_script("checkpoint", str(tmp_path), "8", "1")
    for snapshot in sorted((tmp_path / "snapshots").iterdir(), key=lambda p: int(p.name)):
        found = ckpt.list_checkpoints(snapshot)
        assert found, f"kill {snapshot.name} left no complete checkpoint"
        for path in found:
            ckpt.load_weights(make_model(), path)
        # Every file of the newest one reads and fits: a resume restores it (the run is over).
        tuner = make_tuner(make_model(), max_steps=1, batch_size=8)
        tuner.fit(DatasetAdapter.from_lists(*sentiment_texts(40)), resume_from=found[-1])
        assert tuner.state.step == int(found[-1].name.split("-")[1])


# -- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs: mounting needs root (or mount rights) on Linux; skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small disk to fill")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root and mount rights): {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\1" * max(shutil.disk_usage(disk).free - leave, 0))
    return filler


def size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_a_full_disk_during_save_pretrained_keeps_the_previous_model(make_model, small_disk):
    a, b = make_model(labels=["neg", "pos"]), make_model(labels=["x", "y", "z"])
    target = small_disk / "model"
    a.save_pretrained(target)
    filler = fill(small_disk, leave=size(target) // 2)  # config and tokenizer fit, the weights do not
    with pytest.raises(OSError, match=r"writing failed \(.*No space left on device.*\); model is unchanged"):
        b.save_pretrained(target)
    assert leftovers(small_disk) == []
    np.testing.assert_array_equal(ClassifierModel.from_pretrained(target).logits(TEXTS), a.logits(TEXTS))
    filler.unlink()
    b.save_pretrained(target)
    assert ClassifierModel.from_pretrained(target).labels == ["x", "y", "z"]


def test_a_failed_save_pretrained_keeps_the_previous_model(make_model, tmp_path, monkeypatch):
    """The same without a small disk: the save fails after the encoder and tokenizer files."""
    a, b = make_model(labels=["neg", "pos"]), make_model(labels=["x", "y", "z"])
    a.save_pretrained(tmp_path / "model")

    def disk_full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ClassifierModel, "head_config", disk_full)
    with pytest.raises(
        OSError, match=r"writing failed \(OSError: .*No space left on dev.*; model is unchanged"
    ):
        b.save_pretrained(tmp_path / "model")
    assert leftovers(tmp_path) == []
    loaded = ClassifierModel.from_pretrained(tmp_path / "model")
    assert loaded.labels == ["neg", "pos"]
    np.testing.assert_array_equal(loaded.logits(TEXTS), a.logits(TEXTS))


class FillsTheDisk(Callback):
    """After epoch 1's checkpoint (the Checkpoint callback comes first), leave too little room."""

    def __init__(self, disk: Path) -> None:
        self.disk, self.filler = disk, None

    def on_epoch_end(self, tuner, state, **kwargs):
        if state.epoch == 0 and self.filler is None:
            self.filler = fill(self.disk, leave=size(self.disk / "ckpt" / "step-00000004") // 2)


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_ones(make_model, data, small_disk, tmp_path):
    train, val = data
    model = make_model()
    start = weights(model)
    make_tuner(model, tmp_path / "unbroken", epochs=2).fit(train, val)
    expected = weights(model)

    model.load_state_dict(start)
    directory, filling = small_disk / "ckpt", FillsTheDisk(small_disk)
    with pytest.raises(OSError, match=r"step-00000006: writing failed \(.*\); step-00000006 is unchanged"):
        make_tuner(model, directory, epochs=2, callbacks=[filling]).fit(train, val)
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step-00000003", "step-00000004"]
    assert leftovers(directory) == [] and not (directory / ".lock").exists()
    filling.filler.unlink()
    make_tuner(model, directory, epochs=2, callbacks=[filling]).fit(train, val, resume_from="latest")
    assert_same_weights(weights(model), expected)


# -- two runs, one directory ------------------------------------------------------------------------


def test_a_second_run_on_a_directory_in_use_is_refused_before_it_deletes_anything(make_model, data, tmp_path):
    """The first run is a real process (tests/crash_resume_script.py, slowed down)."""
    train, _ = data
    make_model().save_pretrained(tmp_path / "init")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    script = [sys.executable, str(HERE / "crash_resume_script.py"), str(tmp_path), str(tmp_path / "log")]
    first = subprocess.Popen(
        [*script, "fresh", "--slow"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    directory = tmp_path / "ckpt"
    deadline = time.monotonic() + 60
    while not (directory / ".lock").exists() or not (directory / ".lock").read_text():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the first run did not start within 60 s"
        time.sleep(0.05)
    in_progress = directory / f".tmp-step-00000099-{first.pid}"  # as if it were saving right now
    in_progress.mkdir()
    for resume_from in (None, "latest"):
        with pytest.raises(CheckpointError, match=rf"{directory} is in use by pid {first.pid}: two runs"):
            make_tuner(make_model(), directory).fit(train, resume_from=resume_from)
    assert in_progress.is_dir()
    out, _ = first.communicate(timeout=180)
    assert first.returncode == 0, out
    assert (tmp_path / "final.safetensors").exists() and not (directory / ".lock").exists()


def test_a_stale_lock_is_taken_over(make_model, data, tmp_path, caplog):
    train, _ = data
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    (directory / f".tmp-step-00000003-{dead.pid}").mkdir()  # its save in progress when it died
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        make_tuner(make_model(), directory, epochs=1).fit(train)
    assert f"taking over the lock left by pid {dead.pid} {socket.gethostname()}" in caplog.text
    assert leftovers(directory) == [] and not (directory / ".lock").exists()
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step-00000003", "step-00000004"]


def test_the_lock_is_released_when_fit_raises(make_model, data, tmp_path):
    from test_checkpoint import NaNAt

    train, _ = data
    with pytest.raises(Exception, match="non-finite loss"):
        make_tuner(make_model(), tmp_path, objective=NaNAt({5})).fit(train)
    assert not (tmp_path / ".lock").exists()
    make_tuner(make_model(), tmp_path).fit(train, resume_from="latest")  # the directory is free again


# -- save_pretrained over other files ----------------------------------------------------------------


def test_save_pretrained_replaces_its_own_files_and_refuses_to_delete_others(make_model, model_dir, tmp_path):
    full = make_model()
    lora = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"]).tune(LoRA(r=2))
    target = tmp_path / "model"
    full.save_pretrained(target)
    lora.save_pretrained(target)  # the full model's encoder files go: no mix of the two
    assert not (target / "model.safetensors").exists()
    assert json.loads((target / "llmtune_head.json").read_text())["files"] == sorted(
        p.name for p in target.iterdir()
    )
    full.save_pretrained(target)
    (target / "NOTES.md").write_text("my notes")  # README.md is the model card save_pretrained writes
    with pytest.raises(ConfigError, match=r"holds files that are not part of a saved model: \['NOTES.md'\]"):
        lora.save_pretrained(target)
    assert (target / "NOTES.md").read_text() == "my notes"
    np.testing.assert_array_equal(ClassifierModel.from_pretrained(target).logits(TEXTS), full.logits(TEXTS))
    elsewhere = tmp_path / "notes"  # not a model directory at all
    elsewhere.mkdir()
    (elsewhere / "todo.txt").write_text("train a model")
    with pytest.raises(ConfigError, match=r"notes holds files that are not part of a saved model: \[.todo"):
        full.save_pretrained(elsewhere)
    (elsewhere / "todo.txt").unlink()
    full.save_pretrained(elsewhere)  # an empty directory is fine
