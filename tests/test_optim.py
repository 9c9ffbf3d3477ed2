"""OptimizerFactory: weight-decay groups, head and layer-wise learning rates, schedules."""

from __future__ import annotations

import pytest
import torch

from llmtune import ConfigError, OptimizerFactory


def groups_by_param(model, factory):
    optimizer, _ = factory.build(model, total_steps=100)
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[id(p)] = (group["lr"], group["weight_decay"])
    return {name: out.get(id(p)) for name, p in model.named_parameters()}


def test_no_weight_decay_on_biases_and_layernorm(make_model):
    model = make_model()
    groups = groups_by_param(model, OptimizerFactory.adamw(lr=1e-4, weight_decay=0.1, head_lr=None))
    for name, (_, wd) in groups.items():
        exempt = name.endswith("bias") or "LayerNorm" in name
        assert wd == (0.0 if exempt else 0.1), name
    assert groups["encoder.encoder.layer.0.attention.self.query.weight"][1] == 0.1
    assert groups["encoder.embeddings.LayerNorm.weight"][1] == 0.0


def test_head_lr_and_layer_decay(make_model):
    model = make_model()  # 2 encoder layers
    groups = groups_by_param(model, OptimizerFactory.adamw(lr=1e-4, head_lr=1e-2, layer_decay=0.5))
    # The LambdaLR schedule starts every group at lr * factor(0); warmup=0 -> factor 1.
    assert groups["head.weight"][0] == pytest.approx(1e-2)
    assert groups["encoder.encoder.layer.1.output.dense.weight"][0] == pytest.approx(1e-4)
    assert groups["encoder.encoder.layer.0.output.dense.weight"][0] == pytest.approx(0.5e-4)
    assert groups["encoder.embeddings.word_embeddings.weight"][0] == pytest.approx(0.25e-4)
    assert OptimizerFactory.adamw(lr=5e-5).resolved_head_lr == 1e-3  # "auto"
    assert OptimizerFactory.sgd(lr=0.1).resolved_head_lr == 0.1


def test_only_trainable_parameters_reach_the_optimizer(make_model):
    model = make_model()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    optimizer, _ = OptimizerFactory.adamw().build(model, 10)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.head.parameters()}
    model.head.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        OptimizerFactory.adamw().build(model, 10)


def lr_at(factory, steps, total=100):
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = factory.build(model, total)
    lrs = {}
    for step in range(total + 1):
        if step in steps:
            lrs[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_give_the_right_lr_at_chosen_steps():
    lin = lr_at(OptimizerFactory.adamw(lr=1.0, warmup=10), {0, 5, 10, 55, 100})
    assert lin == pytest.approx({0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0})
    frac = lr_at(OptimizerFactory.adamw(lr=1.0, warmup=0.2), {10, 20, 60})
    assert frac == pytest.approx({10: 0.5, 20: 1.0, 60: 0.5})
    cos = lr_at(OptimizerFactory.adamw(lr=1.0, warmup=10, schedule="cosine"), {10, 55, 100})
    assert cos == pytest.approx({10: 1.0, 55: 0.5, 100: 0.0}, abs=1e-9)
    const = lr_at(OptimizerFactory.sgd(lr=1.0, warmup=4, schedule="constant"), {2, 4, 90})
    assert const == pytest.approx({2: 0.5, 4: 1.0, 90: 1.0})


def test_optimizer_kinds_and_validation():
    model = torch.nn.Linear(2, 2)
    assert isinstance(OptimizerFactory.sgd().build(model, 1)[0], torch.optim.SGD)
    assert isinstance(OptimizerFactory.adam().build(model, 1)[0], torch.optim.Adam)
    assert isinstance(OptimizerFactory.adamw().build(model, 1)[0], torch.optim.AdamW)
    assert OptimizerFactory.sgd(momentum=0.8).build(model, 1)[0].defaults["momentum"] == 0.8
    for bad in ({"name": "lion"}, {"schedule": "step"}, {"lr": 0}, {"warmup": 1.5}, {"layer_decay": 2.0}):
        with pytest.raises(ConfigError):
            OptimizerFactory(**bad)


def test_adam_is_fused_by_default_and_updates_like_the_for_loop(make_model):
    model = make_model()
    fused, _ = OptimizerFactory.adamw(lr=1e-3).build(model, 10)
    assert fused.defaults["fused"] is True
    looped, _ = OptimizerFactory.adamw(lr=1e-3, options={"foreach": False}).build(model, 10)
    assert not looped.defaults.get("fused") and looped.defaults["foreach"] is False
    assert not OptimizerFactory.sgd().build(model, 10)[0].defaults.get("fused")

    # Same update rule: three steps from the same start end at the same weights (rounding aside).
    torch.manual_seed(0)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    results = []
    for options in ({}, {"foreach": False}):
        copy = make_model()
        copy.load_state_dict(model.state_dict())
        optimizer, _ = OptimizerFactory.adamw(lr=1e-3, weight_decay=0.1, options=options).build(copy, 10)
        for step in grads:
            for p, g in zip(copy.parameters(), step):
                p.grad = g.clone()
            optimizer.step()
        results.append(copy.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(results[0]["head.weight"], model.state_dict()["head.weight"])
