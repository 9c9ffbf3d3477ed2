"""From texts to token rows and back: padding ids, truncation or sliding windows, aggregation.

Both ways texts become rows, `DatasetAdapter.tokenize` (training and evaluation data) and
`ClassifierModel.logits` (raw texts), go through `encode`, so they see the same rows; the
rows of one text go back to one output through `aggregate`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .errors import ConfigError

logger = logging.getLogger("llmtune")

AGGREGATIONS = ("mean", "max")
# A share of unknown tokens worth a warning: English text in an English vocabulary has ~0.1%.
UNREADABLE = 0.05


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its end-of-sequence token to pad with (decoders).

    Padded positions are masked out, so which token fills them does not matter.

    Raises:
        ConfigError: the tokenizer has no end-of-sequence token either.
    """
    if tokenizer.pad_token_id is not None:
        return
    if getattr(tokenizer, "eos_token", None) is None:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} has no pad token and no end-of-sequence token to "
            "pad with; set one: tokenizer.pad_token = '<pad>' (and resize the embeddings)."
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("tokenizer %r has no pad token: padding with %r", tokenizer.name_or_path, tokenizer.eos_token)


def padding(tokenizer: Any) -> dict[str, Any]:
    """How batches are padded for `tokenizer`: its pad id, and on which side (`Tokenized` fields).

    Raises:
        ConfigError: no pad token: texts of two lengths cannot share a batch.
    """
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; set one.")
    return {"pad_id": int(tokenizer.pad_token_id), "pad_left": tokenizer.padding_side == "left"}


def clip_pairs(
    tokenizer: Any, first: list[str], second: list[str], max_length: int, margin: int = 16
) -> tuple[list[str], list[str]]:
    """Cut the texts of long pairs a little after the tokens that truncation would keep.

    Fast tokenizers truncate a pair of long texts in time and memory that grow with the
    square of their length (two 40k-character texts: 4 GB), while a single text tokenizes
    in linear time. So each side of a long pair is cut at a token boundary after
    `max_length + margin` tokens, the longer side a margin later, which keeps what
    "longest_first" truncation looks at (which side is longer, the shorter one's length)
    and so gives the same tokens. A tokenizer that truncates on the left
    (`truncation_side="left"`) keeps the ends of the texts, so there the starts are cut.
    """
    long = [i for i, (a, b) in enumerate(zip(first, second)) if min(len(a), len(b)) > max_length]
    if not long or not getattr(tokenizer, "is_fast", False):
        return first, second
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    first, second = list(first), list(second)
    texts = [first[i] for i in long] + [second[i] for i in long]
    spans = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for j, i in enumerate(long):
        a, b = spans[j], spans[len(long) + j]
        for side, mine, other in ((first, a, b), (second, b, a)):
            keep = max_length + margin * (2 if len(mine) > len(other) else 1)
            if len(mine) > keep and left:
                side[i] = side[i][mine[-keep][0] :]  # exactly the last `keep` tokens
            elif len(mine) > keep:
                side[i] = side[i][: mine[keep][0]]  # exactly `keep` tokens before the cut
    return first, second


def encode(
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    stride: int | None = None,
) -> dict[str, Any]:
    """Token rows for `texts` (and the second texts of `pairs`): `input_ids`, maybe
    `token_type_ids`, and `text`, the index of the text each row comes from.

    Without `stride` a text is one row, truncated to `max_length` tokens. With it, a text
    longer than that becomes overlapping windows of `max_length` tokens, `stride` tokens
    of overlap between neighbours (the tokenizer's `return_overflowing_tokens`
    convention); a pair is windowed over its second text (a first text too long for that
    is cut: `cap_first`). A text that fits is one row either way, with the same tokens.
    """
    if pairs is not None:
        refuse_unseparated_pairs(tokenizer)
    if stride is None:
        if pairs is not None:
            texts, pairs = clip_pairs(tokenizer, texts, pairs, max_length)
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        rows = {"input_ids": enc["input_ids"], "text": list(range(len(texts)))}
    else:
        if pairs is not None:
            texts = cap_first(tokenizer, texts, pairs, max_length, stride)
        enc = tokenizer(
            texts,
            pairs,
            truncation="only_second" if pairs is not None else True,
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
        )
        rows = {"input_ids": enc["input_ids"], "text": list(enc["overflow_to_sample_mapping"])}
    if "token_type_ids" in enc:
        rows["token_type_ids"] = enc["token_type_ids"]
    if empty := [i for i, ids in enumerate(rows["input_ids"]) if not ids]:
        # A tokenizer that adds no special tokens (GPT-2's, Qwen2's) reads "" as no tokens at
        # all, which nothing can pool; an empty text reads as end-of-text instead.
        filler = empty_id(tokenizer)
        for i in empty:
            rows["input_ids"][i] = [filler]
            if "token_type_ids" in rows:
                rows["token_type_ids"][i] = [0]
    return rows


def refuse_unseparated_pairs(tokenizer: Any) -> None:
    """Refuse text pairs where the tokenizer puts no token between the two texts.

    A byte-level BPE tokenizer (GPT-2's, Qwen2's, SmolLM2's) joins a pair as the tokens of one
    text after the other, so ("the film", " was good") and ("the", " film was good") would be
    the same input, and the model could not tell where the first text ends.

    Raises:
        ConfigError: nothing separates the two texts of a pair.
    """
    if getattr(tokenizer, "is_fast", False):
        sides = tokenizer("a", "b").sequence_ids()
        if 0 not in sides or 1 not in sides:
            return
        separated = sides.index(1) - (len(sides) - 1 - sides[::-1].index(0)) > 1
    else:
        separated = tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add()
    if not separated:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} puts no token between the two texts of a pair (as "
            "byte-level BPE tokenizers of decoders do), so the model could not tell where the first "
            "ends; join each pair into one text with a separator, e.g. first + '\\n\\n' + second."
        )


def empty_id(tokenizer: Any) -> int:
    """The token an empty text reads as: end-of-sequence, else beginning, padding or unknown."""
    ids = (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return int(next(i for i in ids if i is not None))


def cap_first(tokenizer: Any, first: list[str], second: list[str], max_length: int, stride: int) -> list[str]:
    """First texts of pairs too long to window cut to half a window's room.

    Windows slide over the second text only; a first text that fills the window leaves the
    second no room (the tokenizer raises, or panics where the room left is `stride` or less).
    A pair that fits in one window is left whole, as it is without `stride`.

    Raises:
        ConfigError: `stride` leaves the second texts no room to advance at `max_length`.
    """
    if not getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        return first
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    keep = room // 2
    spans = tokenizer(first, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    long = [i for i, span in enumerate(spans) if len(span) > keep]
    if not long:
        return first
    lengths = tokenizer([second[i] for i in long], add_special_tokens=False)["input_ids"]
    cut = [i for i, ids in zip(long, lengths) if len(spans[i]) + len(ids) > room]
    if cut and room - keep <= stride:
        raise ConfigError(
            f"stride={stride}: windows over the second texts of pairs hold {room - keep} of their "
            f"tokens at max_length={max_length} (the first text keeps at most {keep}); use a stride "
            f"under {room - keep}."
        )
    first = list(first)
    for i in cut:
        first[i] = first[i][: spans[i][keep][0]]  # exactly `keep` tokens before the cut
    return first


def aggregate(rows: np.ndarray, text: np.ndarray | None, how: str = "mean") -> np.ndarray:
    """One output per text from the outputs of its rows (windows): their mean or maximum.

    Args:
        rows: (R, K) outputs, one per row.
        text: (R,) the text each row belongs to, 0..N-1, each at least once; None: one row
            per text, returned as is.
        how: "mean" or "max" (elementwise over the text's rows).

    Returns:
        (N, K) outputs.
    """
    if text is None:
        return rows
    n = int(text.max()) + 1 if len(text) else 0
    if how == "max":
        out = np.full((n, rows.shape[1]), -np.inf, dtype=rows.dtype)
        np.maximum.at(out, text, rows)
        return out
    out = np.zeros((n, rows.shape[1]), dtype=rows.dtype)
    np.add.at(out, text, rows)
    return out / np.bincount(text, minlength=n)[:, None].astype(rows.dtype)


def unknown_share(input_ids: np.ndarray, tokenizer: Any) -> float | None:
    """The share of text tokens (special tokens aside) that are the tokenizer's unknown token.

    None where that cannot be told: no unknown token (byte-level vocabularies read any text),
    an unknown token that is also one the tokenizer adds itself (GPT-2's `<|endoftext|>` is
    its unknown, start and end token), or no text tokens at all.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    added = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "cls", "sep")}
    if unk is None or unk in added:
        return None
    text = ~np.isin(input_ids, [i for i in tokenizer.all_special_ids if i != unk])
    count = int(text.sum())
    return float(np.count_nonzero(input_ids[text] == unk)) / count if count else None


def warn_if_unreadable(share: float | None, tokenizer: Any, source: str, grown: bool = False) -> None:
    """Log a warning when `share` (`unknown_share` of the training tokens) is `UNREADABLE` or more.

    A model fed mostly `[UNK]` trains without error and learns little (all-MiniLM-L6-v2 on
    Chinese reviews: 64% unknown, 0.708 test accuracy against 0.852 for TF-IDF), so this says
    so before training, not after. `fit` first grows the vocabulary where it may
    (`FineTuner(extend_vocabulary=)`, then `grown`); this speaks for what is left unknown.
    """
    if share is not None and share >= UNREADABLE:
        remedy = (
            "the rest is text seen once in the training data"
            if grown
            else "or model.extend_vocabulary(train), before tune(), adds it as new tokens"
        )
        logger.warning(
            "%.0f%% of the tokens of %s are the unknown token %r of tokenizer %r%s: the model cannot "
            "read this text (another language or script than its vocabulary?). A multilingual "
            "encoder reads it, e.g. llmtune.offline.model_path('multilingual-e5-small'); %s.",
            100 * share,
            source,
            tokenizer.unk_token,
            tokenizer.name_or_path,
            " after the new tokens" if grown else "",
            remedy,
        )
