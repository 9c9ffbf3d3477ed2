"""Tuning strategies on all-MiniLM-L6-v2 and real tweets: parameters, speed, memory, size, accuracy.

Each strategy trains in a fresh process (so peak RSS is its own) on the same data for the same
number of epochs, then is scored on a held-out test split. Run from the repository root:

    python benchmarks/strategies.py            # 3000 tweets, 2 epochs, max_length 64: ~5 min on 2 free cores
    python benchmarks/strategies.py --quick    # 2-layer encoder, 400 tweets, 1 epoch: about a minute

Writes benchmarks/results/strategies.md (table) and benchmarks/results/strategies.png (accuracy against
trainable parameters); --quick writes to runs/strategies-quick.* instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "examples"))  # the example's tweet loader

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

from llmtune import BitFit, Full, HeadOnly, LoRA, TopLayers, TuningStrategy  # noqa: E402

# Each row: label, strategy, encoder LR (the usual one for the strategy; the head always
# gets OptimizerFactory's head LR, 1e-3), epochs multiplier.
ROWS: list[tuple[str, TuningStrategy, float, int]] = [
    ("Full", Full(), 5e-5, 1),
    ("TopLayers(2)", TopLayers(2), 1e-4, 1),
    ("BitFit", BitFit(), 1e-3, 1),
    ("LoRA(r=8)", LoRA(r=8), 5e-4, 1),
    ("HeadOnly, no cache", HeadOnly(), 1e-3, 1),
    ("HeadOnly (cached)", HeadOnly(), 1e-3, 1),
    ("HeadOnly (cached), 10x epochs", HeadOnly(), 1e-3, 10),
]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakSampler:
    """Samples this process's RSS every 20 ms in a thread: the peak while a block runs."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def run_row(row: tuple[str, TuningStrategy, float, int], args: argparse.Namespace) -> dict[str, Any]:
    """Train and score one strategy; runs in its own process."""
    import torch
    from peft_lora import default_model, load_tweets

    from llmtune import Callback, ClassifierModel, FineTuner, OptimizerFactory

    label, strategy, lr, epoch_factor = row
    torch.manual_seed(args.seed)
    data = load_tweets(args.size, args.seed)
    train, test = data.split(validation=0.2, seed=args.seed)
    extra = {"num_hidden_layers": 2} if args.quick else {}
    model = ClassifierModel.from_pretrained(
        args.model or default_model(), labels=data.labels, max_length=args.max_length, **extra
    )
    model.tune(strategy)
    counts = strategy.counts(model)

    class EpochTimer(Callback):
        # Wall time, and CPU time of all this process's threads: the CPU is shared with other
        # jobs, which stretches wall time far more than the CPU time the work itself takes.
        def on_epoch_start(self, tuner, state, **kwargs):
            self.start, self.start_cpu = time.perf_counter(), time.process_time()
            self.first = getattr(self, "first", self.start)

        def on_epoch_end(self, tuner, state, **kwargs):
            times.append(time.perf_counter() - self.start)
            cpu_times.append(time.process_time() - self.start_cpu)

    class NoCache(FineTuner):
        def cache_features(self, loader):
            return loader

    times: list[float] = []
    cpu_times: list[float] = []
    timer = EpochTimer()
    tuner = (NoCache if "no cache" in label else FineTuner)(
        model,
        optimizer=OptimizerFactory.adamw(lr=lr, warmup=0.1),
        epochs=args.epochs * epoch_factor,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=False,
        keep_best=False,
        callbacks=[timer],
    )
    rss_before = rss_mb()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        tuner.fit(train)
    fit_s = time.perf_counter() - start
    metrics = tuner.evaluate(test)
    folder = Path(tempfile.mkdtemp())
    try:
        model.save_pretrained(folder)
        saved_mb = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20
    finally:
        shutil.rmtree(folder)
    return {
        "label": label,
        "strategy": repr(strategy),
        "lr": lr,
        "epochs": args.epochs * epoch_factor,
        "trainable": counts.trainable,
        "total": counts.total,
        "setup_s": timer.first - start,  # before the first epoch: the feature cache, if any
        "epoch_s": sum(times) / len(times),
        "epoch_cpu_s": sum(cpu_times) / len(cpu_times),
        "fit_s": fit_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fit_extra_mb": sampler.peak - rss_before,
        "saved_mb": saved_mb,
        "accuracy": metrics["accuracy"],
        "f1": metrics["f1"],
        "load": os.getloadavg()[0],
        "train": len(train),
        "test": len(test),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def table(results: list[dict[str, Any]], args: argparse.Namespace, header: dict[str, str]) -> str:
    full = next((r for r in results if r["label"] == "Full"), None)
    cached = next((r for r in results if r["label"] == "HeadOnly (cached)"), None)
    lines = [
        "# Tuning strategies on all-MiniLM-L6-v2, tweet sentiment (3 classes)",
        "",
        f"- command: `{header['command']}`",
        f"- date: {header['date']}; machine: {header['machine']}",
        f"- load average before / after: {header['load_before']} / {header['load_after']} "
        "(other jobs may share the CPU: times are indicative, compare rows rather than runs)",
        f"- data: {results[0]['train']} training / {results[0]['test']} test tweets (stratified), "
        f"max_length {args.max_length}, batch {args.batch_size}, AdamW with 10% warmup and linear decay, "
        "head LR 1e-3, no validation during training",
        "- each strategy trains in a fresh process; peak RSS is that process's maximum, "
        "'fit +MB' the RSS growth during `fit` over the loaded model and data",
        "",
        "| strategy | LR | epochs | trainable | % | one-off s | s / epoch | CPU s / epoch | peak RSS MB "
        "| fit +MB | saved MB | test acc | macro-F1 | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['epochs']} | {r['trainable']:,} | "
            f"{100 * r['trainable'] / r['total']:.2f} | {r['setup_s']:.1f} | {r['epoch_s']:.2f} | "
            f"{r['epoch_cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['fit_extra_mb']:.0f} | "
            f"{r['saved_mb']:.2f} | {r['accuracy']:.3f} | {r['f1']:.3f} | {r['load']:.1f} |"
        )
    if full and cached:
        lines += [
            "",
            f"Head-only with the feature cache vs full fine-tuning, per epoch: "
            f"**{full['epoch_s'] / cached['epoch_s']:,.0f}x faster** in wall time "
            f"({cached['epoch_s']:.2f} s vs {full['epoch_s']:.1f} s), "
            f"{full['epoch_cpu_s'] / cached['epoch_cpu_s']:,.0f}x in CPU time "
            f"({cached['epoch_cpu_s']:.2f} s vs {full['epoch_cpu_s']:.1f} s). Counting the one-off "
            f"feature pass ({cached['setup_s']:.1f} s), the whole {args.epochs}-epoch fit is "
            f"{full['fit_s'] / cached['fit_s']:.0f}x faster.",
        ]
    lines += [
        "",
        "'one-off s' is the time before the first epoch: for cached head-only training, the single "
        "encoder pass over the training set. 'saved MB' is the folder `save_pretrained` writes "
        "(tokenizer included, ~0.7 MB); a LoRA folder holds the adapter and head, not the encoder. "
        "'CPU s' counts all threads of the process (2 threads: up to 2x wall time when the CPU is free); "
        "'load' is the 1-minute load average when the row finished: about 2 is this benchmark alone "
        "on the 2 cores, more means other jobs competed for them.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[int, float], list[str]] = {}  # rows at the same spot share one label
    for r in results:
        points.setdefault((r["trainable"], round(r["accuracy"], 3)), []).append(r["label"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (trainable, accuracy), labels in points.items():
        ax.scatter(trainable, accuracy, s=40)
        ax.annotate(" / ".join(labels), (trainable, accuracy), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    low, high = min(t for t, _ in points), max(t for t, _ in points)
    ax.set_xlim(low / 2, high * 8)  # room for the labels right of the points
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("all-MiniLM-L6-v2 on tweets: accuracy vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--size", type=int, default=3000, help="tweets in all (80%% train, 20%% test)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/strategies)")
    parser.add_argument("--quick", action="store_true", help="2-layer encoder, 400 tweets, 1 epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs = 400, 1
    stem = Path(args.out or ("runs/strategies-quick" if args.quick else HERE / "results" / "strategies"))
    stem.parent.mkdir(parents=True, exist_ok=True)

    arguments = sys.argv[1:] if argv is None else argv
    header = {
        "command": shlex.join(["python", "benchmarks/strategies.py", *arguments]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    results = []
    for row in ROWS:
        # One process per row: a clean peak RSS, and no allocator state carried between rows.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(run_row, row, args).result()
        results.append(result)
        print(json.dumps(result), flush=True)
    header["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())

    markdown = table(results, args, header)
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=2))
    plot(results, stem.with_suffix(".png"))
    print(markdown)
    print(f"wrote {stem}.md, {stem}.png and {stem}.json")
    return results


if __name__ == "__main__":
    main()
