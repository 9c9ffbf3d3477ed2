"""What differs between model families, one row per family (keyed by `config.model_type`).

A new family is a row here, not an `if model_type == ...` somewhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Family:
    """How llmtune treats one family of models.

    Attributes:
        decoder: a causal language model body: its last non-pad token has read the whole
            text, so pooling "auto" means "last", and position ids follow the attention
            mask (a left-padded row keeps the positions it has alone).
        lora_targets: the attention projections `LoRA()` adapts by default (query and
            value, the choice of the LoRA paper), or a fused QKV projection.
        positions_after_pad: position ids start after the pad id (RoBERTa's scheme), so
            `pad_token_id + 1` of the position table are never used by tokens.
    """

    decoder: bool = False
    lora_targets: tuple[str, ...] | None = None
    positions_after_pad: bool = False


_BERT = Family(lora_targets=("query", "value"))
_ROBERTA = Family(lora_targets=("query", "value"), positions_after_pad=True)
_LLAMA = Family(decoder=True, lora_targets=("q_proj", "v_proj"))
FAMILIES: dict[str, Family] = {
    # encoders
    "bert": _BERT,
    "electra": _BERT,
    "albert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "xlm-roberta-xl": _ROBERTA,
    "camembert": _ROBERTA,
    "data2vec-text": _ROBERTA,
    "roberta-prelayernorm": _ROBERTA,
    "xmod": _ROBERTA,
    "longformer": _ROBERTA,
    "mpnet": Family(lora_targets=("q", "v"), positions_after_pad=True),
    "distilbert": Family(lora_targets=("q_lin", "v_lin")),
    "deberta": Family(lora_targets=("in_proj",)),
    "deberta-v2": Family(lora_targets=("query_proj", "value_proj")),
    "modernbert": Family(lora_targets=("Wqkv",)),
    # decoders
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "smollm3": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "granite": _LLAMA,
    "phi": Family(decoder=True, lora_targets=("q_proj", "v_proj")),
    "phi3": Family(decoder=True, lora_targets=("qkv_proj",)),
    "gpt2": Family(decoder=True, lora_targets=("c_attn",)),
    "gpt_neox": Family(decoder=True, lora_targets=("query_key_value",)),
}


def family(config: Any) -> Family:
    """The row for `config.model_type`; for a family without one, a causal LM architecture
    (`...ForCausalLM` in the config) counts as a decoder."""
    row = FAMILIES.get(getattr(config, "model_type", None))
    if row is not None:
        return row
    architectures = getattr(config, "architectures", None) or []
    return Family(decoder=any("CausalLM" in a for a in architectures))


def positions(config: Any) -> int | None:
    """How many tokens the encoder's absolute position table holds, or None when unbounded."""
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or table <= 0:
        return None
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa-v3: relative positions only
        return None
    if family(config).positions_after_pad:
        table -= (getattr(config, "pad_token_id", None) or 0) + 1
    return table


def max_length(given: int | None, tokenizer: Any, config: Any) -> int:
    """The longest input: as given, else the tokenizer's limit, at most 512 and the positions.

    Raises:
        ConfigError: `given` exceeds the encoder's positions (a longer input would crash it).
    """
    limit = positions(config)
    if given is not None:
        if limit is not None and given > limit:
            raise ConfigError(
                f"max_length={given} but the encoder has {limit} positions; a longer input would "
                f"crash it. Pass max_length <= {limit}."
            )
        return given
    model_max = getattr(tokenizer, "model_max_length", None) or 512
    return min(model_max if model_max < 10**6 else 512, 512, limit or 512)
