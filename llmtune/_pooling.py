"""Pooling: one vector per text from the encoder's hidden states, by name.

"cls" takes the first token (BERT's [CLS]), "mean" averages the real tokens (what
sentence-transformers checkpoints are trained with), "last" takes the last real token (a
decoder's, the only one that has read the whole text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import _families
from .errors import ConfigError


def cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The first position whose mask is 1: column 0 is padding in a left-padded row.
    if mask is None:  # forward() without a mask: no padding
        return hidden[:, 0]
    positions = torch.arange(mask.shape[1], 0, -1, device=mask.device)  # (T,) T..1
    index = (mask * positions).argmax(1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)


def mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)


def last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The last position whose mask is 1, under right or left padding alike: the largest of
    # (position + 1) * mask is unique (argmax does not promise the first of equal values).
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # (T,)
    index = (mask * positions).argmax(1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)


POOLINGS = {"cls": cls, "mean": mean, "last": last}


def resolve(pooling: str, config: Any, name_or_dir: str | os.PathLike) -> str:
    """`pooling`, or for "auto": "last" for a decoder, else what a sentence-transformers
    checkpoint says it was trained with (`1_Pooling/config.json`), else "cls"."""
    if pooling != "auto":
        return pooling
    if _families.family(config).decoder:
        return "last"
    return checkpoint_pooling(name_or_dir) if name_or_dir else "cls"


def checkpoint_pooling(name_or_dir: str | os.PathLike, **hub_kwargs: Any) -> str:
    """The pooling a sentence-transformers checkpoint was trained with ("mean"/"cls"), else "cls"."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            str(name_or_dir),
            "1_Pooling/config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except OSError:
        path = None
    if path is None:
        return "cls"
    config = json.loads(Path(path).read_text())
    modes = {"mean": "mean_tokens", "cls": "cls_token", "last": "lasttoken"}
    for pooling, key in modes.items():
        if config.get(f"pooling_mode_{key}"):
            return pooling
    used = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    if not used:
        return "cls"
    raise ConfigError(
        f"{name_or_dir}: the checkpoint was trained with pooling {used}, which llmtune does not have; "
        "pass pooling='mean', 'cls' or 'last' (or subclass ClassifierModel, see the guide)."
    )
