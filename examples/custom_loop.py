"""The training loop written by hand with llmtune's pieces, for users who want to own the loop.

FineTuner.fit does the same (plus precision, accumulation, callbacks and keeping the best
weights). Here every step is on the page: DatasetAdapter.loader makes padded batches,
ClassifierModel maps them to logits, the Objective turns logits into a loss, and
OptimizerFactory.build gives the optimizer and the learning-rate schedule.

    python examples/custom_loop.py            # all-MiniLM-L6-v2, 2,000 tweets, 2 epochs
    python examples/custom_loop.py --quick    # smoke run: 2-layer encoder, 300 tweets, 1 epoch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from llmtune import ClassifierModel, DatasetAdapter, Objective, OptimizerFactory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentiment import default_model, load_tweets  # noqa: E402  (the data helpers of the main example)


@torch.no_grad()
def evaluate(model: ClassifierModel, data: DatasetAdapter, objective: Objective) -> dict[str, float]:
    """Loss and the objective's metrics over all of `data`."""
    model.eval()
    logits, targets = [], []
    for batch in data.loader(model.tokenizer, batch_size=64, max_length=model.max_length):
        logits.append(model(**batch))
        targets.append(batch["labels"])
    out, y = torch.cat(logits), torch.cat(targets)  # (N, K), (N,)
    metrics = {name: fn(out.numpy(), y.numpy()) for name, fn in objective.metrics().items()}
    return {"loss": float(objective(out, y)), **metrics}


def train(
    model: ClassifierModel,
    train_data: DatasetAdapter,
    val_data: DatasetAdapter,
    *,
    objective: Objective,
    optimizer_factory: OptimizerFactory,
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Plain PyTorch training: epochs -> batches -> forward -> loss -> backward -> clip -> step."""
    torch.manual_seed(seed)
    loader = train_data.loader(
        model.tokenizer, batch_size=batch_size, max_length=model.max_length, shuffle=True, seed=seed
    )
    optimizer, scheduler = optimizer_factory.build(model, total_steps=epochs * len(loader))
    history = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)  # a new, reproducible shuffle each epoch
        model.train()
        losses = []
        for batch in loader:
            logits = model(**batch)  # (B, K)
            loss = objective(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        record.update({f"val_{k}": v for k, v in evaluate(model, val_data, objective).items()})
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        history.append(record)
    return history


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder: Hub name or local directory")
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2-layer encoder, 300 tweets, 1 epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs = 300, 1

    data = load_tweets(args.size, args.seed)
    rest, test = data.split(validation=0.2, seed=args.seed)
    train_data, val_data = rest.split(validation=0.1, seed=args.seed)
    extra = {"num_hidden_layers": 2} if args.quick else {}
    model = ClassifierModel.from_pretrained(
        args.model or default_model(), labels=data.labels, max_length=args.max_length, **extra
    )
    objective = Objective.cross_entropy()
    train(
        model,
        train_data,
        val_data,
        objective=objective,
        optimizer_factory=OptimizerFactory.adamw(lr=5e-5, warmup=0.1),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    result = evaluate(model, test, objective)
    print(f"test accuracy {result['accuracy']:.3f}, macro-F1 {result['f1']:.3f} on {len(test)} tweets")
    return result


if __name__ == "__main__":
    main()
