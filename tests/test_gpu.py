"""FineTuner on a CUDA GPU: mixed precision learns, fp16 overflow steps are skipped and counted,
outputs match the CPU's, and a model saved on the GPU loads on the CPU; every encoder and
decoder family on every task in bf16, and the LLM recipe (bf16 weights, LoRA, checkpointing).

Marked `gpu` and skipped without CUDA. `pytest -m gpu tests/test_gpu.py` on a GPU machine;
`benchmarks/gpu_check.py` runs it there. `LLMTUNE_GPU_TESTS_ON=cpu` runs the same tests on the
CPU (GPU-only assertions skipped), to check the tests themselves on a machine without a GPU.
First run on a GPU: one H200, 2026-11-30, 47 passed (benchmarks/README.md, "GPU check").
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import sentiment_texts, task_data
from families import DECODERS, FAMILIES, tiny_backbone

from llmtune import ClassifierModel, DatasetAdapter, FineTuner, LoRA, OptimizerFactory

DEVICE = os.environ.get("LLMTUNE_GPU_TESTS_ON", "cuda")
ON_CUDA = DEVICE == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def needs_bf16() -> None:
    # Capability 8 (Ampere) is the first with bf16 tensor cores; torch emulates it below that.
    if ON_CUDA and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability >= 8")


@pytest.fixture
def sentiment():
    texts, labels = sentiment_texts(400)
    return DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)


def tuner_for(model, precision: str, device: str = DEVICE, **kwargs) -> FineTuner:
    kwargs = {"epochs": 6, "batch_size": 16, "progress": False, "keep_best": False, **kwargs}
    kwargs.setdefault("optimizer", OptimizerFactory.adamw(lr=3e-3))
    return FineTuner(model, precision=precision, device=device, **kwargs)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns(make_model, sentiment, precision):
    if precision == "bf16":
        needs_bf16()
    train, val = sentiment
    tuner = tuner_for(make_model(labels=train.labels), precision)
    history = tuner.fit(train, val)
    assert tuner.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert tuner.model.device.type == torch.device(DEVICE).type
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert tuner.evaluate(val)["accuracy"] >= 0.9  # chance is 0.5
    if precision == "bf16":  # bf16 has fp32's range: nothing overflows
        assert tuner.state.skipped == 0


@pytest.mark.skipif(not ON_CUDA, reason="GPU precision choice")
def test_auto_precision_is_bf16_from_compute_capability_8(make_model):
    tuner = FineTuner(make_model(), precision="auto", device="cuda", progress=False)
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert tuner.dtype == (torch.bfloat16 if native_bf16 else torch.float16)


class OverflowOnce:
    """Forward hook on the head: on the `at`-th training forward, the logits' gradient becomes inf.

    The loss stays finite, as in a real fp16 overflow, which happens in the scaled backward pass;
    the grad scaler must find the inf, skip the optimizer step and lower its scale.
    """

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not module.training:
            return
        self.calls += 1
        if self.calls == self.at:
            output.register_hook(lambda grad: torch.full_like(grad, float("inf")))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_fp16_overflow_step_is_skipped_and_counted(make_model, nonfinite):
    texts, labels = sentiment_texts(40)
    data = DatasetAdapter.from_lists(texts, labels)

    def run(overflow_at: int | None) -> FineTuner:
        torch.manual_seed(0)
        model = make_model(dropout=0.0)
        if overflow_at is not None:
            model.head.register_forward_hook(OverflowOnce(overflow_at))
        tuner = tuner_for(model, "fp16", epochs=1, batch_size=8, nonfinite=nonfinite)
        tuner.fit(data)
        return tuner

    clean = run(None)
    steps = clean.state.steps_per_epoch  # 5 batches of 8
    assert clean.state.skipped == 0, "the unscaled run must not overflow by itself"
    assert clean.state.step == steps
    # With fp16 an inf gradient is the grad scaler's business, not an error, whatever `nonfinite`.
    tuner = run(overflow_at=3)
    state = tuner.state
    assert state.scaler.get_scale() < clean.state.scaler.get_scale(), "the overflow did not reach the scaler"
    assert state.skipped == 1
    assert state.step == steps - 1, "a skipped step must not count as an optimizer step"
    assert state.history.records[-1]["step"] == steps - 1
    if nonfinite == "skip":
        assert state.history.records[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in tuner.model.parameters()), "the skipped step leaked"


@pytest.fixture
def trained(make_model, sentiment):
    """A model trained in fp32 on DEVICE (dropout off, so outputs are deterministic), and the data."""
    train, val = sentiment
    tuner = tuner_for(make_model(labels=train.labels, dropout=0.0), "fp32", epochs=3)
    tuner.fit(train)
    return tuner, val


def test_evaluate_and_predict_match_the_cpu(trained):
    tuner, val = trained
    here = tuner.predict(val)
    here_metrics = tuner.evaluate(val)
    here_labels = tuner.model.predict(val.dataset["text"], precision="fp32")
    cpu = tuner_for(tuner.model, "fp32", device="cpu")  # predict moves the model to the CPU
    # fp32 on both sides (no TF32): only summation order differs.
    np.testing.assert_allclose(here, cpu.predict(val), rtol=1e-4, atol=1e-4)
    cpu_metrics = cpu.evaluate(val)
    assert here_metrics["accuracy"] == cpu_metrics["accuracy"]
    assert here_metrics["loss"] == pytest.approx(cpu_metrics["loss"], rel=1e-4, abs=1e-5)
    assert tuner.model.device.type == "cpu"
    assert tuner.model.predict(val.dataset["text"], precision="fp32") == here_labels


def test_saved_on_gpu_loads_on_cpu(trained, tmp_path):
    tuner, val = trained
    model = tuner.model
    assert model.device.type == torch.device(DEVICE).type
    expected = tuner.predict(val)
    model.save_pretrained(tmp_path / "model")
    loaded = ClassifierModel.from_pretrained(tmp_path / "model")
    assert loaded.device.type == "cpu"
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key].cpu(), theirs[key]), key  # the bytes, not approximately
    cpu = tuner_for(loaded, "fp32", device="cpu")
    np.testing.assert_allclose(cpu.predict(val), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_task_learns_in_bf16_and_predicts_like_the_cpu(family, task, tokenizer):
    """Each encoder and decoder family, on each task: a bf16 fit on the GPU lowers the loss with
    no skipped step, and the trained model's fp32 outputs on the GPU equal the CPU's."""
    needs_bf16()
    train, val = task_data(task, n=240).split(validation=0.2, seed=0)
    labels = None if task == "regression" else train.labels
    model = ClassifierModel(
        tiny_backbone(family, len(tokenizer)), tokenizer, labels=labels, task=task, dropout=0.0
    )
    tuner = tuner_for(model, "bf16", epochs=10)
    history = tuner.fit(train)
    assert tuner.model.device.type == torch.device(DEVICE).type
    assert np.isfinite(history.train_loss).all()
    assert history.train_loss[-1] < 0.6 * history.train_loss[0], history.train_loss
    assert tuner.state.skipped == 0
    here = tuner_for(tuner.model, "fp32").predict(val)
    cpu = tuner_for(tuner.model, "fp32", device="cpu").predict(val)
    np.testing.assert_allclose(here, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", DECODERS)
def test_a_bf16_decoder_with_lora_and_checkpointing_learns_and_keeps_its_base(family, tokenizer, tmp_path):
    """The LLM recipe on a GPU: bf16 weights, LoRA, gradient checkpointing, bf16 autocast."""
    needs_bf16()
    tiny_backbone(family, len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts, labels = sentiment_texts(240)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.2, seed=0)
    model = ClassifierModel.from_pretrained(
        tmp_path, labels=train.labels, dtype=torch.bfloat16, gradient_checkpointing=True, dropout=0.0
    ).tune(LoRA(r=8, dropout=0.0))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert base and all(p.dtype == torch.bfloat16 for p in base.values())
    tuner = tuner_for(model, "bf16", epochs=10, optimizer=OptimizerFactory.adamw(lr=1e-2))
    history = tuner.fit(train, val)
    assert history.train_loss[-1] < 0.6 * history.train_loss[0], history.train_loss
    assert tuner.evaluate(val)["accuracy"] >= 0.8  # chance is 0.5
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param.detach().cpu(), base[name].cpu()), f"{name} moved"
