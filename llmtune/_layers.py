"""The encoder's layers, found once from its module structure.

What `TopLayers`, layer-wise learning-rate decay and gradient checkpointing all ask: which
modules are the stacked blocks, and how deep each parameter sits.
"""

from __future__ import annotations

from torch import nn

from .errors import ConfigError


def find_layers(encoder: nn.Module) -> nn.ModuleList | None:
    """The `nn.ModuleList` of the encoder's stacked blocks, one per layer, outermost first.

    It is the first ModuleList of `config.num_hidden_layers` modules of one class: BERT's
    `encoder.layer`, DistilBERT's `transformer.layer`, GPT-2's `h`, Llama's `layers`, also
    under a peft wrapper. None when no such list exists, as in ALBERT, whose layers share
    one set of weights.
    """
    count = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    for module in encoder.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and len(module) == (count or len(module))
            and len({type(m) for m in module}) == 1
        ):
            return module
    return None


def layers_of(model: nn.Module) -> nn.ModuleList:
    """The model's layers: its `encoder_layers()` when it has one, else found in `model.encoder`.

    Raises:
        ConfigError: the layers cannot be told apart (ALBERT's are one shared set).
    """
    if hasattr(model, "encoder_layers"):
        layers = model.encoder_layers()
    else:
        layers = find_layers(getattr(model, "encoder", model))
    if layers is None:
        config = getattr(getattr(model, "encoder", model), "config", None)
        kind = getattr(config, "model_type", "this encoder")
        raise ConfigError(
            f"cannot tell {kind}'s layers apart: no list of one module per layer (ALBERT's layers "
            "share one set of weights). Train it whole or with BitFit/LoRA, or subclass "
            "ClassifierModel and override encoder_layers()."
        )
    return layers


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Depth of every encoder parameter, by its name in `model.encoder`.

    Layer i has depth i + 1. Parameters before the first layer, and every embedding table
    wherever it sits (DeBERTa's relative positions and their norm come after the layers),
    have depth 0; the rest after the last layer (a final norm) have depth L + 1.

    Raises:
        ConfigError: the layers cannot be told apart (see `layers_of`).
    """
    layers = layers_of(model)
    encoder = getattr(model, "encoder", model)
    in_layer = {id(p): i + 1 for i, layer in enumerate(layers) for p in layer.parameters()}
    embeddings = {id(p) for m in encoder.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    # DeBERTa(-v3)'s norm of its relative-position table sits after the layers, but every
    # layer reads its output: it belongs with the embeddings, not on top.
    embeddings |= {
        id(p)
        for m in encoder.modules()
        if isinstance(getattr(m, "rel_embeddings", None), nn.Embedding) and isinstance(m.LayerNorm, nn.Module)
        for p in m.LayerNorm.parameters()
    }
    depths, seen_layers = {}, False
    for name, param in encoder.named_parameters():
        if id(param) in in_layer:
            depths[name], seen_layers = in_layer[id(param)], True
        elif id(param) in embeddings or not seen_layers:
            depths[name] = 0
        else:
            depths[name] = len(layers) + 1
    return depths
