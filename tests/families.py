"""Tiny random-weight backbones of every model family llmtune claims, built on the spot.

Encoders: BERT, RoBERTa, DistilBERT, DeBERTa-v2, ELECTRA, ALBERT, XLM-R, ModernBERT.
Decoders: Llama, Qwen2, Gemma, GPT-2. Each has 2 layers, width 32 and 4 heads, and takes
the vocabulary size and pad id of the test tokenizer.
"""

from __future__ import annotations

ENCODERS = ("bert", "roberta", "distilbert", "deberta-v2", "electra", "albert", "xlm-roberta", "modernbert")
DECODERS = ("llama", "qwen2", "gemma", "gpt2")
FAMILIES = ENCODERS + DECODERS

_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_EXTRA = {
    "distilbert": dict(dim=32, hidden_dim=64, n_heads=4, n_layers=2),
    "albert": dict(embedding_size=16, **_SIZES),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64),
    "llama": dict(num_key_value_heads=2, **_SIZES),
    "qwen2": dict(num_key_value_heads=2, **_SIZES),
    "gemma": dict(num_key_value_heads=2, head_dim=8, **_SIZES),
    "modernbert": dict(global_attn_every_n_layers=1, **_SIZES),
}


def tiny_config(family: str, vocab_size: int = 100, pad_token_id: int = 0, max_positions: int = 64):
    from transformers import AutoConfig

    options = _EXTRA.get(family, _SIZES)
    positions = {"gpt2": "n_positions"}.get(family, "max_position_embeddings")
    # Special ids inside the tiny vocabulary: the test tokenizer's [CLS] is 2 and [SEP] 3.
    ids = dict(bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
    config = AutoConfig.for_model(family, vocab_size=vocab_size, pad_token_id=pad_token_id, **ids, **options)
    setattr(config, positions, max_positions)
    return config


def tiny_backbone(family: str, vocab_size: int = 100, pad_token_id: int = 0, max_positions: int = 64):
    """A random-weight `AutoModel` of `family` (eval mode off: as from_pretrained gives it)."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(tiny_config(family, vocab_size, pad_token_id, max_positions))
