"""Plot training and validation curves from a History (or a HistoryLogger JSON-lines file) to a PNG.

    python examples/plot_history.py --history runs/history.jsonl --out curves.png   # plot a saved run
    python examples/plot_history.py --out curves.png            # train briefly on tweets, then plot
    python examples/plot_history.py --quick --out curves.png    # smoke run: 2-layer encoder, 300 tweets

`FineTuner(callbacks=[HistoryLogger("runs/history.jsonl")])` writes such a file during
training; `tuner.fit` also returns the same records as a `History`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtune import ClassifierModel, FineTuner, History, OptimizerFactory


def read_history(path: str | Path) -> History:
    """A History from a HistoryLogger file (one JSON record per line)."""
    lines = Path(path).read_text().splitlines()
    return History([json.loads(line) for line in lines if line.strip()])


def plot_history(history: History | Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Save the loss curves (train and validation) and any other validation metrics, one panel each.

    matplotlib is imported here, with the non-interactive Agg backend, so importing this
    module costs nothing and the plot works on a machine without a display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = history.records if isinstance(history, History) else list(history)
    if not records:
        raise ValueError("the history is empty: nothing to plot")
    epochs = [r["epoch"] for r in records]
    others = sorted({k for r in records for k in r if k.startswith("val_") and k != "val_loss"})
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(4.5 * (1 + len(others)), 3.5), squeeze=False)
    loss_ax = axes[0][0]
    loss_ax.plot(epochs, [r.get("train_loss") for r in records], marker="o", label="train")
    if any("val_loss" in r for r in records):
        loss_ax.plot(epochs, [r.get("val_loss") for r in records], marker="o", label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()
    for ax, key in zip(axes[0][1:], others):
        ax.plot(epochs, [r.get(key) for r in records], marker="o", color="tab:orange")
        ax.set(title=key.removeprefix("val_") + " (validation)", xlabel="epoch")
    for ax in axes[0]:
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--history", default=None, help="a HistoryLogger .jsonl file to plot (no training)")
    parser.add_argument("--out", default="runs/history.png", help="where the PNG goes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="train a 2-layer encoder on 300 tweets first")
    args = parser.parse_args(argv)

    if args.history:
        history = read_history(args.history)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sentiment import default_model, load_tweets

        size, extra = (300, {"num_hidden_layers": 2}) if args.quick else (2000, {})
        train, val = load_tweets(size, seed=0).split(validation=0.2, seed=0)
        model = ClassifierModel.from_pretrained(default_model(), labels=train.labels, max_length=64, **extra)
        epochs = 2 if args.quick else args.epochs
        tuner = FineTuner(model, optimizer=OptimizerFactory.adamw(warmup=0.1), epochs=epochs, progress=False)
        history = tuner.fit(train, val)
    path = plot_history(history, args.out)
    print(f"wrote {path} ({len(history)} epochs)")
    return path


if __name__ == "__main__":
    main()
