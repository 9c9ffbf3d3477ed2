"""The encoder's layers come from its module structure, one answer for TopLayers and layer decay."""

from __future__ import annotations

import pytest
from families import FAMILIES, tiny_backbone

from llmtune import ClassifierModel, ConfigError, OptimizerFactory, TopLayers

LAYERED = [f for f in FAMILIES if f != "albert"]


def classifier(family, tokenizer):
    return ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=["a", "b"])


@pytest.mark.parametrize("family", LAYERED)
def test_top_layers_trains_the_last_layer_and_what_is_above_it(family, tokenizer):
    model = classifier(family, tokenizer).tune(TopLayers(1))
    top = {id(p) for p in model.encoder_layers()[-1].parameters()}
    lower = {id(p) for p in model.encoder_layers()[0].parameters()}
    embeddings = model.encoder.get_input_embeddings().weight
    assert all(p.requires_grad for p in model.encoder.parameters() if id(p) in top)
    assert not any(p.requires_grad for p in model.encoder.parameters() if id(p) in lower)
    assert not embeddings.requires_grad
    assert all(p.requires_grad for p in model.head.parameters())


def test_shared_layers_are_refused_with_a_reason(tokenizer):
    # ALBERT runs one set of layer weights N times: "the top k layers" trains all of them.
    model = classifier("albert", tokenizer)
    with pytest.raises(ConfigError, match="albert's layers apart.*share one set of weights"):
        model.tune(TopLayers(1))
    with pytest.raises(ConfigError, match="albert's layers apart"):
        OptimizerFactory.adamw(layer_decay=0.5).param_groups(model)
    OptimizerFactory.adamw().param_groups(model)  # without layer decay ALBERT is fine


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "gpt2", "llama", "modernbert"])
def test_layer_decay_follows_depth(family, tokenizer):
    model = classifier(family, tokenizer)
    groups = OptimizerFactory.adamw(lr=1.0, head_lr=9.0, layer_decay=0.5).param_groups(model)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    layers = model.encoder_layers()
    assert {lr[id(p)] for p in layers[-1].parameters()} == {1.0}
    assert {lr[id(p)] for p in layers[0].parameters()} == {0.5}
    assert lr[id(model.encoder.get_input_embeddings().weight)] == 0.25
    assert lr[id(model.head.weight)] == 9.0


def test_a_subclass_that_names_its_layers_reaches_every_user(tokenizer):
    # One source of truth: overriding encoder_layers() changes TopLayers and layer decay alike.
    class FirstLayerIsTheTop(ClassifierModel):
        def encoder_layers(self):
            return super().encoder_layers()[:1]

    def build():
        return FirstLayerIsTheTop(tiny_backbone("bert", len(tokenizer)), tokenizer, labels=["a", "b"])

    model = build().tune(TopLayers(1))
    assert all(p.requires_grad for p in model.encoder.encoder.layer[0].parameters())
    # The second block now sits "above the layers", as a final norm would: it trains too.
    assert all(p.requires_grad for p in model.encoder.encoder.layer[1].parameters())
    assert not model.encoder.get_input_embeddings().weight.requires_grad
    model = build()
    groups = OptimizerFactory.adamw(lr=1.0, layer_decay=0.5).param_groups(model)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr[id(model.encoder.get_input_embeddings().weight)] == 0.5


def test_deberta_v3s_relative_position_norm_sits_with_the_embeddings(tokenizer):
    # Its norm of the relative-position table comes after the layers in parameter order, but
    # every layer reads it: as a "final norm" TopLayers(1) trained it and changed layer 0.
    from families import tiny_config
    from transformers import AutoModel

    from llmtune._layers import layer_depths

    config = tiny_config("deberta-v2", len(tokenizer))
    config.update(dict(relative_attention=True, norm_rel_ebd="layer_norm", position_biased_input=False))
    model = ClassifierModel(AutoModel.from_config(config), tokenizer, labels=["a", "b"])
    depths = layer_depths(model)
    assert depths["encoder.rel_embeddings.weight"] == depths["encoder.LayerNorm.weight"] == 0
    model.tune(TopLayers(1))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("encoder.encoder.layer.1.", "head.")) for n in trained)
