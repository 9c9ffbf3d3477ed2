"""Saves again and again in a forked child that is SIGKILLed at random moments, for tests/test_faults.py.

Usage: python fault_script.py {save_pretrained,checkpoint} WORKDIR KILLS SEED

save_pretrained: WORKDIR/a and WORKDIR/b hold two saved models (the test's A and B) and
    WORKDIR/target holds A; each child saves A, B, A, B... into WORKDIR/target.
checkpoint: WORKDIR/init holds a saved model; each child writes checkpoints step after step
    into WORKDIR/ckpt (Checkpoint.save: write, then prune to the last two).

After each kill the parent copies what the victim left (WORKDIR/target or WORKDIR/ckpt) to
WORKDIR/snapshots/<i> for the test to check, then forks the next child. Importing torch
once and forking keeps each kill cheap; torch runs on one thread, so forking is safe.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import sentiment_texts  # noqa: E402

from llmtune import Checkpoint, ClassifierModel, DatasetAdapter, FineTuner  # noqa: E402


def save_models(workdir: Path) -> tuple[Path, Callable[[int], None]]:
    models = [ClassifierModel.from_pretrained(workdir / name) for name in ("a", "b")]

    def loop(_: int) -> None:
        while True:
            for model in models:
                model.save_pretrained(workdir / "target")

    return workdir / "target", loop


def save_checkpoints(workdir: Path) -> tuple[Path, Callable[[int], None]]:
    model = ClassifierModel.from_pretrained(workdir / "init")
    train = DatasetAdapter.from_lists(*sentiment_texts(40))
    tuner = FineTuner(model, max_steps=1, batch_size=8, precision="fp32", progress=False)
    tuner.fit(train)
    saver = Checkpoint(workdir / "ckpt", every_n_steps=1, keep_last=2)
    saver.save(tuner, tuner.state, epoch_done=False)  # there is always one to fall back on

    def loop(child: int) -> None:
        tuner.state.step = 1000 * (child + 1)  # each child writes new step directories, pruning older ones
        while True:
            tuner.state.step += 1
            saver.save(tuner, tuner.state, epoch_done=False)

    return workdir / "ckpt", loop


def main() -> None:
    mode, workdir, kills, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    target, loop = {"save_pretrained": save_models, "checkpoint": save_checkpoints}[mode](workdir)
    rng = random.Random(seed)
    for i in range(kills):
        pid = os.fork()
        if pid == 0:
            try:
                loop(i)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        snapshot = workdir / "snapshots" / str(i)
        if target.exists():
            shutil.copytree(target, snapshot)
        else:
            snapshot.mkdir(parents=True)
            (snapshot / "MISSING").touch()
    print("done", flush=True)


if __name__ == "__main__":
    main()
