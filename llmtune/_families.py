"""What differs between model families, one row per family (keyed by `config.model_type`).

A new family is a row here, not an `if model_type == ...` somewhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """How llmtune treats one family of models.

    Attributes:
        positions_after_pad: position ids start after the pad id (RoBERTa's scheme), so
            `pad_token_id + 1` of the position table are never used by tokens.
    """

    positions_after_pad: bool = False


_ROBERTA_LIKE = Family(positions_after_pad=True)
FAMILIES: dict[str, Family] = {
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "xlm-roberta-xl": _ROBERTA_LIKE,
    "camembert": _ROBERTA_LIKE,
    "data2vec-text": _ROBERTA_LIKE,
    "roberta-prelayernorm": _ROBERTA_LIKE,
    "longformer": _ROBERTA_LIKE,
    "mpnet": _ROBERTA_LIKE,
    "xmod": _ROBERTA_LIKE,
}


def family(config: Any) -> Family:
    """The row for `config.model_type` (defaults for a family without one)."""
    return FAMILIES.get(getattr(config, "model_type", None), Family())


def positions(config: Any) -> int | None:
    """How many tokens the encoder's absolute position table holds, or None when unbounded."""
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or table <= 0:
        return None
    if family(config).positions_after_pad:
        table -= (getattr(config, "pad_token_id", None) or 0) + 1
    return table
