"""A tiny training run for the crash-and-resume test: started, SIGKILLed and resumed as a subprocess.

Usage: python crash_resume_script.py WORKDIR LOG {fresh,resume} [--slow]
WORKDIR holds `init/` (a saved ClassifierModel); checkpoints go to WORKDIR/ckpt, the final
weights to WORKDIR/final.safetensors and the history to WORKDIR/history.json. LOG gets one
JSON line per optimizer step: the step, its loss and a hash of each micro-batch's tokens.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import sentiment_texts  # noqa: E402

from llmtune import Callback, ClassifierModel, DatasetAdapter, FineTuner, OptimizerFactory  # noqa: E402
from llmtune.checkpoint import Checkpoint  # noqa: E402


class StepLog(Callback):
    """Writes each step's loss and batch hashes at once (the process may die any moment)."""

    def __init__(self, path: str, slow: bool) -> None:
        self.file = open(path, "a")  # noqa: SIM115 - open for the life of the process
        self.slow = slow
        self.batches: list[str] = []

    def hook(self, module, args, kwargs):
        if module.training:
            self.batches.append(hashlib.sha256(kwargs["input_ids"].numpy().tobytes()).hexdigest()[:12])

    def on_step_end(self, tuner, state, *, loss, **kwargs):
        record = {"step": state.step, "loss": loss.item(), "batches": self.batches}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.batches = []
        if self.slow:  # gives the test time to kill it mid-run; sleeping changes no numbers
            time.sleep(0.25)


def main() -> None:
    workdir, log, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)  # same kernels and reduction order in every run
    torch.manual_seed(0)
    model = ClassifierModel.from_pretrained(workdir / "init")
    texts, labels = sentiment_texts(72)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=16, seed=0)
    steps = StepLog(log, slow="--slow" in sys.argv)
    model.register_forward_pre_hook(steps.hook, with_kwargs=True)
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=3e-3, warmup=0.2),
        epochs=3,
        batch_size=8,
        grad_accum=2,
        precision="fp32",
        progress=False,
        # The log first: a step's line is written before its checkpoint can exist.
        callbacks=[steps, Checkpoint(workdir / "ckpt", every_n_steps=3, keep_last=2)],
    )
    history = tuner.fit(train, val, resume_from="latest" if mode == "resume" else None)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, workdir / "final.safetensors")
    (workdir / "history.json").write_text(json.dumps(history.records))


if __name__ == "__main__":
    main()
