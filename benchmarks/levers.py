"""Levers tried against llmtune's defaults and not kept, one at a time on quality.py's draws.

Each lever patches one thing for the run and is otherwise quality.py's `run_llmtune`; the
figures in docs/quality.md ("Tried since (thirteenth session)", the 8,000-tweets lever table,
the Trainer paragraph of the e5 section, the regression section) come from these arms:

    python benchmarks/levers.py rows-near-mean --data reviews-zh --encoder minilm --size 1000
    python benchmarks/levers.py rows-lr-0.3 --data reviews-zh --encoder minilm --size 64
    python benchmarks/levers.py mixed-pairs --data reviews-zh --encoder minilm --size 1000
    python benchmarks/levers.py known-neighbours --data reviews-zh --encoder minilm --size 1000
    python benchmarks/levers.py cls --data reviews-zh --encoder e5 --size 1000
    python benchmarks/levers.py random-pooler --data reviews-zh --encoder e5 --size 1000
    python benchmarks/levers.py random-pooler --data tweets --size full
    python benchmarks/levers.py mean-hidden --data tweets --size full --seeds 0
    python benchmarks/levers.py sparse-restore --data confidence --size 8 --seeds 0 1 2 3 4 5 6 7 8 9
    python benchmarks/levers.py rows-first --data reviews-zh --encoder minilm --size 1000 --seeds 0 1
    python benchmarks/levers.py reinit-top --data reviews-zh --encoder minilm --size 1000
    python benchmarks/levers.py reinit-top --data tweets --size full --seeds 0
    python benchmarks/levers.py reinit-top --data reviews-zh --encoder e5 --size 1000 --seeds 0
    python benchmarks/levers.py layer-decay --data tweets --size full --seeds 0
    python benchmarks/levers.py layer-decay --data reviews-zh --encoder minilm --size 1000
    python benchmarks/levers.py random-pooler --data reviews-zh --encoder e5 --size 1000 --max-length 512
    python benchmarks/levers.py random-pooler --data tweets --size 1000
    python benchmarks/levers.py label-smoothing --data tweets --size full
    python benchmarks/levers.py label-smoothing --data reviews-zh --encoder minilm --size 1000 \
        --max-length 512
    python benchmarks/levers.py warmup --data tweets --size full
    python benchmarks/levers.py warmup --data reviews-zh --encoder minilm --size full --max-length 512
    python benchmarks/levers.py tapt --data reviews-zh --encoder minilm --size 1000 --max-length 512
    python benchmarks/levers.py tapt-long --data reviews-zh --encoder minilm --size 1000 --max-length 512
    python benchmarks/levers.py wise --data tweets --size 8 --seeds 0 1 2 3 4 5 6 7 8 9
    python benchmarks/levers.py wise --data reviews-zh --encoder e5 --size 8 --max-length 512 --seeds 0

A lever is `(stack, seed, train, model options) -> FineTuner options`: it enters its patches
in `stack`, may add model options and may put what it measured of itself in `REPORT`.
Chinese reviews run at max length 128 unless `--max-length` says otherwise, as quality.py's
first rows for them. Prints one JSON line a seed (test scores, the arm's `REPORT`, seconds;
session17.jsonl's MLM fields were merged in from the run's log by hand).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from llmtune import (  # noqa: E402
    ClassifierModel,
    FineTuner,
    Full,
    KeepBest,
    Objective,
    OptimizerFactory,
    _runtime,
)
from llmtune import _vocabulary as vocabulary  # noqa: E402
from llmtune._layers import layers_of  # noqa: E402
from llmtune._state import plan_steps  # noqa: E402
from llmtune.tuning import TuningStrategy  # noqa: E402


def single_characters(tokenizer, texts):
    """Per text: (text, [(is unknown, id, start, end)]) of its non-blank tokens."""
    unk = tokenizer.unk_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        yield text, [(i == unk, i, a, b) for i, (a, b) in zip(ids, offsets, strict=True) if text[a:b].strip()]


def mixed_spans(tokenizer, texts, min_count=2):
    """`unknown_spans`, with pairs of an unknown character and a known one-character token (不错)."""
    singles, pairs = Counter(), Counter()
    for text, items in single_characters(tokenizer, texts):
        singles.update(text[a:b].strip() for u, _, a, b in items if u)
        for (u1, _, a1, b1), (u2, _, a2, b2) in zip(items, items[1:]):
            one = [u or (b - a == 1 and text[a].isalnum()) for u, a, b in ((u1, a1, b1), (u2, a2, b2))]
            if b1 == a2 and (u1 or u2) and all(one):
                pairs[text[a1:b2]] += 1
    return [
        *sorted((s for s, n in singles.items() if n >= min_count), key=lambda s: (-singles[s], s)),
        *sorted(
            (s for s, n in pairs.items() if n >= vocabulary.PAIR_MIN_COUNT), key=lambda s: (-pairs[s], s)
        ),
    ]


def known_neighbours(tokenizer, texts, min_count=2) -> list[int]:
    """Ids of known one-character tokens next to an unknown one (no space) `min_count` times or more."""
    seen = Counter()
    for text, items in single_characters(tokenizer, texts):
        for k, (u, i, a, b) in enumerate(items):
            if u or b - a != 1 or not text[a].isalnum():
                continue
            left = k > 0 and items[k - 1][0] and items[k - 1][3] == a
            right = k + 1 < len(items) and items[k + 1][0] and items[k + 1][2] == b
            seen[i] += left or right
    return [i for i, n in seen.items() if n >= min_count]


REPORT: dict = {}  # what an arm measured of itself (the MLM's steps, last loss, seconds), for the row


def rows_near_mean(stack: ExitStack, seed: int, train, extra: dict) -> dict:
    """Random new rows at a tenth of the old rows' spread (above CONTEXT_MAX_TEXTS texts only)."""
    draws = vocabulary._draws
    stack.enter_context(mock.patch.object(vocabulary, "_draws", lambda n, dim, s: draws(n, dim, s) * 0.1))
    return {}


def rows_lr(stack: ExitStack, seed: int, train, extra: dict, factor: float = 0.3) -> dict:
    """The grown embedding in its own optimizer group at `factor` times the head's LR."""
    groups = OptimizerFactory.param_groups

    def patched(self, model):
        grown, out = vocabulary.new_rows(model), []
        for g in groups(self, model):
            k = next((j for j, p in enumerate(g["params"]) if p is grown), None)
            if k is None:
                out.append(g)
                continue
            out.append({**g, "params": [grown], "param_names": [g["param_names"][k]], "lr": g["lr"] * factor})
            rest = [j for j in range(len(g["params"])) if j != k]
            if rest:
                names = [g["param_names"][j] for j in rest]
                out.append({**g, "params": [g["params"][j] for j in rest], "param_names": names})
        return out

    stack.enter_context(mock.patch.object(OptimizerFactory, "param_groups", patched))
    return {}


def mixed_pairs(stack: ExitStack, seed: int, train, extra: dict) -> dict:
    stack.enter_context(mock.patch.object(vocabulary, "unknown_spans", mixed_spans))
    return {}


def known_rows(stack: ExitStack, seed: int, train, extra: dict) -> dict:
    """The known neighbours' rows train too, from their pretrained values (pairs as the defaults')."""
    spans, add_rows, before = vocabulary.unknown_spans, vocabulary.add_rows, []

    def remember(tokenizer, texts, min_count=2):
        before.append(tokenizer)  # the tokenizer before extend_vocabulary's grown copy
        return spans(tokenizer, texts, min_count)

    def add(encoder, tokenizer, texts, ids, seed):
        add_rows(encoder, tokenizer, texts, ids, seed)
        encoder.get_input_embeddings().llmtune_new_rows[known_neighbours(before[-1], texts)] = True

    stack.enter_context(mock.patch.object(vocabulary, "unknown_spans", remember))
    stack.enter_context(mock.patch.object(vocabulary, "add_rows", add))
    return {}


def random_pooler(stack: ExitStack, seed: int, train, extra: dict, first_token: bool = True) -> dict:
    """The Trainer's model: [CLS] (or the defaults' pooling) through dense + tanh started at random
    (std 0.02), then the head."""

    class RandomPooler(ClassifierModel):
        @classmethod
        def from_pretrained(cls, directory, **kwargs):
            if first_token:
                kwargs["pooling"] = "cls"
            model = super().from_pretrained(directory, **kwargs)
            d = model.encoder.config.hidden_size
            model.pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
            torch.manual_seed(seed)
            model.pooler[0].reset_parameters()
            nn.init.normal_(model.pooler[0].weight, std=0.02)
            nn.init.zeros_(model.pooler[0].bias)
            return model

        def encode(self, input_ids, attention_mask, token_type_ids=None):
            return self.pooler(super().encode(input_ids, attention_mask, token_type_ids))

    stack.enter_context(mock.patch.object(quality, "ClassifierModel", RandomPooler))
    return {}


def first_token(stack: ExitStack, seed: int, train, extra: dict) -> dict:
    """The defaults with `pooling="cls"`, the first token's state instead of the mean."""
    extra["pooling"] = "cls"
    return {}


class SparseKeepBest(KeepBest):
    """Best-weights restore over the first evaluation and every k-th after it only."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def on_fit_start(self, tuner, state, **kwargs):
        super().on_fit_start(tuner, state, **kwargs)
        self.count = 0

    def on_evaluate(self, tuner, state, **kwargs):
        count, self.count = self.count, self.count + 1
        if count % self.k == 0:
            super().on_evaluate(tuner, state, **kwargs)


def sparse_restore(stack: ExitStack, seed: int, train, extra: dict, candidates: int = 10) -> dict:
    steps = math.ceil(len(train) / 32)  # the defaults' batch size and min_steps
    epochs = plan_steps(steps, None, None, 100)[0] // steps
    return {"callbacks": [SparseKeepBest(max(1, math.ceil(epochs / candidates)))]}


@dataclass(frozen=True)
class NewRowsOnly(TuningStrategy):
    """Of the encoder only the input embedding trains (and of it only the rows a grown vocabulary added)."""

    def apply(self, model):
        embedding = model.encoder.get_input_embeddings().weight
        for param in model.encoder.parameters():
            param.requires_grad_(param is embedding)
        return self._finish(model)


def rows_first(stack: ExitStack, seed: int, train, extra: dict) -> dict:
    """A first run of the defaults' length trains only the new rows and the head (the encoder
    frozen), then the defaults' run trains everything from there: the encoder's first steps no
    longer follow gradients through random rows."""

    class RowsFirst(FineTuner):
        def fit(self, train, validation=None, **kwargs):
            self.model.extend_vocabulary(train)  # as the defaults' fit would (tune() stops fit growing it)
            self.model.tune(NewRowsOnly())
            FineTuner(self.model, seed=self.seed, progress=False).fit(train, validation)
            self.model.tune(Full())
            self.extend_vocabulary = False
            return super().fit(train, validation, **kwargs)

    stack.enter_context(mock.patch.object(quality, "FineTuner", RowsFirst))
    return {}


def reinit_top(stack: ExitStack, seed: int, train, extra: dict, count: int = 1) -> dict:
    """The top `count` encoder layers started afresh as the encoder's own init would (normal at
    `initializer_range`, zero biases, unit LayerNorms): "Revisiting few-sample BERT fine-tuning"
    (Zhang et al., 2021) found its pretrained top layers a poor start on small sets."""

    class Reinit(ClassifierModel):
        @classmethod
        def from_pretrained(cls, directory, **kwargs):
            model = super().from_pretrained(directory, **kwargs)
            std = model.encoder.config.initializer_range
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for module in layers_of(model.encoder)[-count:].modules():
                    if isinstance(module, nn.Linear):
                        nn.init.normal_(module.weight, 0.0, std, generator=generator)
                        nn.init.zeros_(module.bias)
                    elif isinstance(module, nn.LayerNorm):
                        nn.init.ones_(module.weight)
                        nn.init.zeros_(module.bias)
            return model

    stack.enter_context(mock.patch.object(quality, "ClassifierModel", Reinit))
    return {}


def layer_decay(stack: ExitStack, seed: int, train, extra: dict, factor: float = 0.9) -> dict:
    """Layer-wise LR decay: the encoder layer at depth i of L at 5e-5 * factor ** (L - i)."""
    return {"optimizer": OptimizerFactory.adamw(layer_decay=factor)}


def label_smoothing(stack: ExitStack, seed: int, train, extra: dict, amount: float = 0.1) -> dict:
    """Cross-entropy against targets smoothed toward uniform (the tweets' labels are noisy: many
    had annotators disagree)."""
    return {"objective": Objective.cross_entropy(label_smoothing=amount)}


def warmup(stack: ExitStack, seed: int, train, extra: dict, fraction: float = 0.1) -> dict:
    """The LR rises linearly over the first tenth of the steps: a new head's first, random
    gradients reach the encoder at a tenth of the LR (at 8,000 examples no probe fits it first)."""
    return {"optimizer": OptimizerFactory.adamw(warmup=fraction)}


def tapt(
    stack: ExitStack,
    seed: int,
    train,
    extra: dict,
    epochs: int = 5,
    batch: int = 32,
    mask: float = 0.15,
    body_lr: float = 5e-5,
) -> dict:
    """Task-adaptive MLM (Gururangan et al. 2020) on the training text once the vocabulary grew:
    the new rows learn from every token's context, not from 1,000 labels alone. A BERT MLM
    transform (new) and a decoder tied to the grown embedding; the body at `body_lr`, the new rows
    and the transform at the head's LR; the pretrained rows stay fixed (add_rows masks them)."""
    from transformers import DataCollatorForLanguageModeling, get_scheduler
    from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

    grow = FineTuner.grow_vocabulary

    def grow_then_mlm(self, data, share):
        added = grow(self, data, share)
        if not added:
            return added
        model, generator = self.model, torch.Generator().manual_seed(seed)
        encoder, tokenizer = model.encoder, model.tokenizer
        embedding = encoder.get_input_embeddings()
        transform = BertPredictionHeadTransform(encoder.config).to(embedding.weight.device)
        bias = nn.Parameter(torch.zeros(embedding.num_embeddings, device=embedding.weight.device))
        body = [p for p in encoder.parameters() if p is not embedding.weight and p.requires_grad]
        head_lr = self.optimizer.resolved_head_lr
        optimizer = torch.optim.AdamW(
            [
                {"params": body, "lr": body_lr},
                {"params": [embedding.weight], "lr": head_lr, "weight_decay": 0.0},
                {"params": [*transform.parameters(), bias], "lr": head_lr},
            ]
        )
        texts = list(data.dataset["text"])
        encoded = tokenizer(texts, truncation=True, max_length=model.max_length)["input_ids"]
        collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask, seed=seed)
        steps = epochs * math.ceil(len(encoded) / batch)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
        encoder.train()
        began = time.perf_counter()
        # Batches of like length (as FineTuner's), in a random order: little padding at 512 tokens.
        by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        batches = [by_length[k : k + batch] for k in range(0, len(by_length), batch)]
        for _ in range(epochs):
            for b in torch.randperm(len(batches), generator=generator).tolist():
                features = collate([{"input_ids": encoded[i]} for i in batches[b]])
                with _runtime.autocast(self.device, self.dtype):
                    hidden = encoder(
                        input_ids=features["input_ids"], attention_mask=features["attention_mask"]
                    ).last_hidden_state
                    masked = features["labels"] != -100
                    logits = transform(hidden[masked]) @ embedding.weight.T + bias
                loss = nn.functional.cross_entropy(logits.float(), features["labels"][masked])
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        REPORT.update(mlm_steps=steps, mlm_last_loss=loss.item(), mlm_seconds=time.perf_counter() - began)
        return added

    stack.enter_context(mock.patch.object(FineTuner, "grow_vocabulary", grow_then_mlm))
    return {}


def wise(stack: ExitStack, seed: int, train, extra: dict, alphas=(0.0, 0.25, 0.5, 0.75)) -> dict:
    """WiSE-FT (Wortsman et al. 2022) from the probe: the weights (1 - a) * probed + a * fine-tuned.
    One run a seed; the test scores at each `a` go in REPORT (a = 1 is the defaults' own row).
    Only runs the probe starts (the short ones) have a probed state to interpolate from."""
    probe_head, fit, evaluate = FineTuner.probe_head, FineTuner.fit, FineTuner.evaluate
    probed: dict = {}

    def probe_then_keep(self, *args, **kwargs):
        out = probe_head(self, *args, **kwargs)
        probed.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return out

    def fit_then_mark(self, *args, **kwargs):
        out = fit(self, *args, **kwargs)
        self._wise_fitted = True
        return out

    def evaluate_along(self, data, *args, **kwargs):
        if not getattr(self, "_wise_fitted", False) or not probed:
            return evaluate(self, data, *args, **kwargs)
        tuned = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for a in alphas:
            mixed = {k: (1 - a) * probed[k] + a * v if v.is_floating_point() else v for k, v in tuned.items()}
            self.model.load_state_dict(mixed)
            scores = evaluate(self, data, *args, **kwargs)
            REPORT.update(
                {f"{name}@{a}": float(v) for name, v in scores.items() if name in ("accuracy", "f1", "mse")}
            )
        self.model.load_state_dict(tuned)
        return evaluate(self, data, *args, **kwargs)

    stack.enter_context(mock.patch.object(FineTuner, "probe_head", probe_then_keep))
    stack.enter_context(mock.patch.object(FineTuner, "fit", fit_then_mark))
    stack.enter_context(mock.patch.object(FineTuner, "evaluate", evaluate_along))
    return {}


LEVERS = {
    "defaults": lambda stack, seed, train, extra: {},
    "rows-near-mean": rows_near_mean,
    "rows-lr-0.3": rows_lr,
    "mixed-pairs": mixed_pairs,
    "known-neighbours": known_rows,
    "cls": first_token,
    "random-pooler": random_pooler,
    "mean-hidden": lambda stack, seed, train, extra: random_pooler(
        stack, seed, train, extra, first_token=False
    ),
    "sparse-restore": sparse_restore,
    "rows-first": rows_first,
    "reinit-top": reinit_top,
    "layer-decay": layer_decay,
    "label-smoothing": label_smoothing,
    "warmup": warmup,
    "tapt": tapt,
    "wise": wise,
    "tapt-long": lambda stack, seed, train, extra: tapt(
        stack, seed, train, extra, epochs=12, mask=0.3, body_lr=1e-4
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lever", choices=list(LEVERS))
    parser.add_argument("--data", default="reviews-zh", choices=list(quality.LOADERS))
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--size", default="1000")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full-cap", type=int, default=8000, help="at most this many in the 'full' size")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens read (Chinese reviews: 128 unless given)"
    )
    args = parser.parse_args(argv)
    pool, val_pool, test = quality.fixed_splits(quality.LOADERS[args.data]())
    encoder, _ = quality.encoder_choice(args.encoder)
    length = args.max_length or (128 if args.data == "reviews-zh" else None)
    extra = {"max_length": length} if length else {}
    for seed in args.seeds:
        cap = args.full_cap if args.size == "full" else None
        train, val = quality.draws(pool, val_pool, args.size, seed, cap)
        start = time.perf_counter()
        REPORT.clear()
        with ExitStack() as stack:
            model_options = dict(extra)
            options = LEVERS[args.lever](stack, seed, train, model_options)
            metrics = quality.run_llmtune(train, val, test, encoder, seed, model_options, **options)
        scores = {k: float(v) for k, v in metrics.items() if isinstance(v, float)}
        row = {"lever": args.lever, "max_length": length, "data": args.data, "size": args.size, "seed": seed}
        print(json.dumps({**row, **scores, **REPORT, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
