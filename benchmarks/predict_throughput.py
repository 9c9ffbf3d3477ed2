"""Inference throughput: `ClassifierModel.predict` against `transformers.pipeline("text-classification")`.

Both run the same weights: all-MiniLM-L6-v2 with a sequence-classification head (BERT's pooler
+ a linear layer, seeded), saved once and loaded by each contender; on the llmtune side the
pooler sits where ClassifierModel's dropout is (identity in eval mode), so both compute the
same function and their predictions can be compared text by text. Same 2,000 tweets, batch
64, same threads; each contender in its own process (peak RSS is its own), one warm-up call on
64 texts before the clock. Run from the repository root:

    python benchmarks/predict_throughput.py            # 2,000 tweets: about a minute on 2 cores
    python benchmarks/predict_throughput.py --quick    # 300 tweets

Writes benchmarks/results/predict.{md,json} (--quick: runs/predict-quick.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # see benchmarks/peft.py
sys.path.append(str(HERE.parent / "examples"))
sys.path.append(str(HERE))

VARIANTS = ("llmtune", "llmtune-fp32", "pipeline")


def texts_for(args: argparse.Namespace) -> list[str]:
    from sentiment import load_tweets

    return list(load_tweets(args.size, args.seed).dataset["text"])[: args.size]


def llmtune_model(directory: str) -> Any:
    """The saved sequence-classification model as a ClassifierModel computing the same function."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from llmtune import ClassifierModel

    config = AutoConfig.from_pretrained(directory)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    model = ClassifierModel.from_pretrained(directory, labels=labels, pooling="cls")
    weights = load_file(Path(directory) / "model.safetensors")
    pooler = torch.nn.Linear(config.hidden_size, config.hidden_size)
    pooler.load_state_dict(
        {"weight": weights["bert.pooler.dense.weight"], "bias": weights["bert.pooler.dense.bias"]}
    )
    model.dropout = torch.nn.Sequential(pooler, torch.nn.Tanh())  # BERT's pooler: tanh(dense(h_cls))
    model.head.load_state_dict({"weight": weights["classifier.weight"], "bias": weights["classifier.bias"]})
    return model


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    texts = texts_for(args)
    if args.child == "pipeline":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

        model = AutoModelForSequenceClassification.from_pretrained(args.dir)
        tokenizer = AutoTokenizer.from_pretrained(args.dir)
        pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")

        def predict(batch: list[str]) -> list[str]:
            return [r["label"] for r in pipe(batch, batch_size=args.batch_size, truncation=True)]
    else:
        model = llmtune_model(args.dir)
        precision = "fp32" if args.child == "llmtune-fp32" else "auto"

        def predict(batch: list[str]) -> list[str]:
            return model.predict(batch, batch_size=args.batch_size, precision=precision)

    predict(texts[: args.batch_size])  # warm-up
    start = time.perf_counter()
    labels = predict(texts)
    seconds = time.perf_counter() - start
    result = {
        "variant": args.child,
        "seconds": seconds,
        "texts_s": len(texts) / seconds,
        "labels": labels,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def save_model(args: argparse.Namespace, directory: str) -> None:
    import torch
    from sentiment import load_tweets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    labels = load_tweets(args.size, args.seed).labels
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    )
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # a head with opinions, so argmax is not a tie
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(directory)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--size", type=int, default=2000, help="tweets to classify")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None, help="output path stem (default benchmarks/results/predict)")
    parser.add_argument("--quick", action="store_true", help="300 tweets")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args)
        return []
    if args.quick:
        args.size = 300
    if args.model is None:
        from sentiment import default_model

        args.model = default_model()
    from train_throughput import machine

    stem = Path(args.out or ("runs/predict-quick" if args.quick else HERE / "results" / "predict"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    command = ["python", "benchmarks/predict_throughput.py", *(sys.argv[1:] if argv is None else argv)]
    header = {
        "command": shlex.join(command),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    results = []
    with tempfile.TemporaryDirectory() as directory:
        save_model(args, directory)
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", variant, "--dir", directory, "--size", str(args.size)]
            cmd += [
                "--batch-size",
                str(args.batch_size),
                "--seed",
                str(args.seed),
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            results.append(result)
            print(f"{variant:14s} {result['texts_s']:7.1f} texts/s  load {result['load']:.1f}", flush=True)
    header["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    reference = next((r for r in results if r["variant"] == "pipeline"), results[-1])
    lines = [
        "# Inference throughput: ClassifierModel.predict vs transformers.pipeline",
        "",
        f"- command: `{header['command']}`",
        f"- date: {header['date']}; machine: {header['machine']}",
        f"- load average (1, 5, 15 min) before / after: {header['load_before']} / {header['load_after']}",
        f"- all-MiniLM-L6-v2 + a seeded classification head, {args.size} tweets, batch {args.batch_size}, "
        f"{args.threads} threads, one process per contender, timed after a warm-up call",
        "",
        "| contender | texts/s | seconds | peak RSS MB | vs pipeline | same label as pipeline | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        agree = sum(a == b for a, b in zip(r["labels"], reference["labels"])) / len(reference["labels"])
        r["agreement"] = agree
        lines.append(
            f"| {r['variant']} | {r['texts_s']:.1f} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['texts_s'] / reference['texts_s']:.2f}x | {100 * agree:.1f}% | {r['load']:.1f} |"
        )
    lines += [
        "",
        '`llmtune` is `predict(texts, batch_size=64)` with its default precision ("auto": bf16 autocast '
        'on CPUs with native bf16 matmuls, as here); `llmtune-fp32` passes `precision="fp32"`. Both '
        "tokenize the whole list once and run batches in length order; the pipeline tokenizes and pads "
        "each batch of 64 in input order, in fp32. Times include tokenization.",
    ]
    markdown = "\n".join(lines) + "\n"
    for r in results:
        r.pop("labels")
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=2))
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    return results


if __name__ == "__main__":
    main()
