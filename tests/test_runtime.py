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


def test_fp16_precision_on_fp16_weights_that_train_is_refused_up_front(make_model):
    # The grad scaler unscales fp32 gradients only: fp16 weights that train (a model loaded
    # with dtype=torch.float16, e.g. on a T4, where "auto" is fp16) used to reach torch's
    # "Attempting to unscale FP16 gradients" at the first step.
    from llmtune import ConfigError

    texts, labels = sentiment_texts(16)
    model = make_model(dropout=0.0)
    model.encoder.half()
    tuner = FineTuner(model, epochs=1, batch_size=8, precision="fp16", progress=False, keep_best=False)
    with pytest.raises(ConfigError, match="float16"):
        tuner.fit(DatasetAdapter.from_lists(texts, labels))
    assert tuner.state is None or tuner.state.step == 0


@pytest.mark.parametrize("capability, expected", [((7, 5), None), ((8, 0), torch.bfloat16)])
def test_predicting_on_a_gpu_never_autocasts_to_fp16(monkeypatch, capability, expected):
    # Training's fp16 has a grad scaler; a prediction has no guard against fp16's overflow, and
    # the docs promise fp32 where bf16 is not native (T4, V100).
    from llmtune import _runtime

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert _runtime.inference_precision("auto", cuda) == expected
    assert _runtime.inference_precision("fp16", cuda) == torch.float16  # asked for: given
    assert _runtime.resolve_precision("auto", cuda) == (expected or torch.float16)  # training: fp16 + scaler


def test_predict_and_calibrate_take_the_inference_rule(make_model, monkeypatch):
    from llmtune import _runtime

    asked = []
    rule = _runtime.inference_precision
    monkeypatch.setattr(_runtime, "inference_precision", lambda p, d: asked.append(p) or rule(p, d))
    model = make_model()
    model.predict(["good film"], precision="fp32")
    texts, labels = sentiment_texts(16)
    model.calibrate(DatasetAdapter.from_lists(texts, labels))
    assert asked == ["fp32", "auto"]


def test_max_steps_counts_the_steps_that_happened(make_model):
    # 4 steps a pass and max_steps=4: a skipped overflow step left the run one short, its
    # linear schedule stopped at a quarter of the peak rate instead of 0.
    texts, labels = sentiment_texts(32)
    model = make_model(dropout=0.0)
    calls = []
    model.head.weight.register_hook(
        lambda grad: calls.append(1) or (grad * float("inf") if len(calls) == 2 else grad)
    )
    steps = Steps()
    tuner = FineTuner(
        model, max_steps=4, batch_size=8, precision="fp16", progress=False, callbacks=[steps], keep_best=False
    )
    history = tuner.fit(DatasetAdapter.from_lists(texts, labels))
    assert tuner.state.step == 4 and tuner.state.skipped == 1 and steps.steps == [1, 2, 3, 4]
    assert steps.lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the schedule ran to its end
    assert [r["epoch"] for r in history.records] == [1, 2]  # the fourth step came from a second pass
