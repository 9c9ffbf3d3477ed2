"""The GPU-side choices, tested on a CPU: precision by compute capability, the fp16 grad scaler."""

from __future__ import annotations

import pytest
import torch
from conftest import sentiment_texts

from llmtune import Callback, DatasetAdapter, FineTuner, OptimizerFactory
from llmtune._runtime import resolve_precision

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_precision_follows_the_compute_capability(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() says yes on a T4 (7.5) too, counting bf16 emulated
    # without tensor cores; "auto" must give such GPUs fp16.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", CUDA) is expected
    assert resolve_precision("fp32", CUDA) is None


class Steps(Callback):
    def __init__(self):
        self.steps, self.lrs = [], []

    def on_step_end(self, tuner, state, **kwargs):
        self.steps.append(state.step)
        self.lrs.append(state.scheduler.get_last_lr()[0])


def test_an_fp16_step_the_grad_scaler_skips_is_not_counted(make_model):
    # The grad scaler runs on a CPU too. One step's gradient is made inf (the loss stays
    # finite): the scaler leaves the weights alone, so the loop must not count that step,
    # step the schedule or report it, and must count it as skipped.
    texts, labels = sentiment_texts(32)
    model = make_model(dropout=0.0)
    calls = []

    def overflow_on_third_window(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == 3 else grad

    model.head.weight.register_hook(overflow_on_third_window)
    steps = Steps()
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=1e-3, warmup=2),
        epochs=1,
        batch_size=8,
        precision="fp16",
        progress=False,
        callbacks=[steps],
    )
    history = tuner.fit(DatasetAdapter.from_lists(texts, labels))
    assert tuner.state.scaler.is_enabled()
    assert steps.steps == [1, 2, 3]  # 4 windows, the third skipped
    assert tuner.state.skipped == 1 and history.records[0]["skipped_steps"] == 1
    assert tuner.state.scheduler.last_epoch == 3
    # Warmup over 2 real steps, then linear decay: the skip took no learning rate step.
    assert steps.lrs == pytest.approx([5e-4, 1e-3, 5e-4], rel=1e-6)  # 4 steps planned
    assert tuner.state.scaler.get_scale() == 2.0**15  # halved once


def test_an_fp16_skip_leaves_the_weights_as_they_were(make_model):
    texts, labels = sentiment_texts(8)
    model = make_model(dropout=0.0)
    model.head.weight.register_hook(lambda grad: grad * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = FineTuner(model, epochs=1, batch_size=8, precision="fp16", progress=False, keep_best=False)
    tuner.fit(DatasetAdapter.from_lists(texts, labels))
    assert tuner.state.step == 0 and tuner.state.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
