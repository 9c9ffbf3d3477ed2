"""Inference throughput: `ClassifierModel.predict` against `transformers.pipeline("text-classification")`
and the same model exported to ONNX, run by onnxruntime in fp32 and with dynamic int8 weights.

All run the same weights: all-MiniLM-L6-v2 with a sequence-classification head (BERT's pooler
+ a linear layer) trained on 2,000 other tweets with llmtune (HeadOnly: the encoder frozen,
its features cached), saved once and loaded by each contender; on the llmtune side the pooler
sits where ClassifierModel's dropout is (identity in eval mode), so all compute the same
function and their predictions can be compared text by text and scored on the test split.
The ONNX graph is `export_onnx` of that ClassifierModel, `model.int8.onnx` its
`llmtune.onnx.quantize` (onnxruntime's `quantize_dynamic`), run through `llmtune_onnx`
(onnxruntime + tokenizers, no torch in the process). Same 2,000 test tweets, batch 64, same
threads; each contender in its own process (peak RSS is its own), one warm-up call on 64 texts
before the clock; the contenders take turns, round after round (--repeat), and each row is
its median run. Run from the repository root:

    python benchmarks/predict_throughput.py            # 3 rounds: about 6 minutes on 2 cores
    python benchmarks/predict_throughput.py --quick    # 300 tweets, 1 round

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
sys.path.append(str(HERE.parent / "examples"))
sys.path.append(str(HERE))

VARIANTS = ("llmtune", "llmtune-fp32", "pipeline", "onnx", "onnx-int8")


def splits(args: argparse.Namespace) -> tuple[Any, Any]:
    """(train, test): `args.train_size` tweets to train the head on, `args.size` to predict."""
    from sentiment import load_tweets

    data = load_tweets(args.size + args.train_size, args.seed)
    return data.split(validation=args.size, seed=args.seed)


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


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: it survives exec, so a child
    of the parent that trained the head would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    texts = json.loads(Path(args.texts).read_text())
    if args.child.startswith("onnx"):  # no torch in this process: what a prediction service needs
        import llmtune_onnx

        exported = llmtune_onnx.load(args.onnx, quantized=args.child == "onnx-int8", threads=args.threads)

        def predict(batch: list[str]) -> list[str]:
            return exported.predict(batch, batch_size=args.batch_size)

        threads = args.threads
    else:
        import torch

        torch.set_num_threads(args.threads)
        threads = torch.get_num_threads()
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
        "peak_rss_mb": peak_rss_mb(),
        "load": os.getloadavg()[0],
        "threads": threads,
        "torch_imported": "torch" in sys.modules,
    }
    print("RESULT " + json.dumps(result), flush=True)


def save_model(args: argparse.Namespace, directory: str, train: Any) -> dict[str, Any]:
    """A sequence-classification model whose pooler and head were trained with llmtune (HeadOnly)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from llmtune import FineTuner, HeadOnly

    hf_logging.set_verbosity_error()
    labels = train.labels
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    )
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(directory)
    ours = llmtune_model(directory).tune(HeadOnly())  # the pooler (in dropout's place) trains too
    start = time.perf_counter()
    FineTuner(ours, epochs=args.train_epochs, progress=False, seed=args.seed).fit(train)
    seconds = time.perf_counter() - start
    weights = load_file(Path(directory) / "model.safetensors")
    pooler, head = ours.dropout[0], ours.head
    weights |= {"bert.pooler.dense.weight": pooler.weight, "bert.pooler.dense.bias": pooler.bias}
    weights |= {"classifier.weight": head.weight, "classifier.bias": head.bias}
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, Path(directory) / "model.safetensors")
    return {"train_examples": len(train), "train_epochs": args.train_epochs, "train_seconds": seconds}


def export(args: argparse.Namespace, directory: str, onnx_dir: str) -> dict[str, Any]:
    from llmtune.onnx import quantize

    start = time.perf_counter()
    llmtune_model(directory).export_onnx(onnx_dir)
    exported = time.perf_counter()
    int8 = quantize(onnx_dir)
    return {
        "export_seconds": exported - start,
        "quantize_seconds": time.perf_counter() - exported,
        "onnx_mb": (Path(onnx_dir) / "model.onnx").stat().st_size / 1e6,
        "int8_mb": int8.stat().st_size / 1e6,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--size", type=int, default=2000, help="test tweets to classify")
    parser.add_argument("--train-size", type=int, default=2000, help="tweets the head is trained on")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each contender runs once a round")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None, help="output path stem (default benchmarks/results/predict)")
    parser.add_argument("--quick", action="store_true", help="300 tweets, 1 round")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--texts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args)
        return []
    if args.quick:
        args.size, args.train_size, args.train_epochs, args.repeat = 300, 300, 1, 1
    if args.model is None:
        from sentiment import default_model

        args.model = default_model()
    from statistics import median

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
    variants = args.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    train, test = splits(args)
    truth = [test.labels[i] for i in test.dataset["label"]]
    with tempfile.TemporaryDirectory() as directory:
        header |= save_model(args, directory, train)
        onnx_dir, texts = str(Path(directory) / "onnx"), str(Path(directory) / "texts.json")
        if any(v.startswith("onnx") for v in variants):
            header |= export(args, directory, onnx_dir)
        Path(texts).write_text(json.dumps(list(test.dataset["text"])))
        for round_ in range(args.repeat):
            for variant in variants:
                cmd = [sys.executable, __file__, "--child", variant, "--dir", directory, "--onnx", onnx_dir]
                cmd += [
                    "--texts",
                    texts,
                    "--batch-size",
                    str(args.batch_size),
                    "--threads",
                    str(args.threads),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise SystemExit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT ") :])
                runs[variant].append(result)
                print(
                    f"round {round_ + 1}: {variant:12s} {result['texts_s']:7.1f} texts/s  "
                    f"load {result['load']:.1f}",
                    flush=True,
                )
    header["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = []
    for done in runs.values():
        speeds = [r["texts_s"] for r in done]
        middle = sorted(done, key=lambda r: r["texts_s"])[len(done) // 2]
        labels = done[0]["labels"]
        results.append(
            {
                **{k: v for k, v in middle.items() if k != "labels"},
                "texts_s": median(speeds),
                "all_texts_s": speeds,
                "peak_rss_mb": median(r["peak_rss_mb"] for r in done),
                "accuracy": sum(a == b for a, b in zip(labels, truth)) / len(truth),
                "labels": labels,
            }
        )
    reference = next((r for r in results if r["variant"] == "pipeline"), results[-1])
    fp32 = next((r for r in results if r["variant"] == "onnx"), None)
    lines = [
        "# Inference throughput: ClassifierModel.predict vs transformers.pipeline vs onnxruntime",
        "",
        f"- command: `{header['command']}`",
        f"- date: {header['date']}; machine: {header['machine']}",
        f"- load average (1, 5, 15 min) before / after: {header['load_before']} / {header['load_after']}",
        f"- all-MiniLM-L6-v2 + a classification head (BERT pooler + linear) trained with llmtune HeadOnly on "
        f"{header['train_examples']} other tweets ({header['train_epochs']} epochs, "
        f"{header['train_seconds']:.0f} s); {args.size} test tweets, batch {args.batch_size}, "
        f"{args.threads} threads, one process per contender "
        f"and run, timed after a warm-up call; {args.repeat} rounds, interleaved; each row its median run",
    ]
    if "export_seconds" in header:
        lines.append(
            f"- ONNX export {header['export_seconds']:.1f} s ({header['onnx_mb']:.1f} MB), int8 quantization "
            f"{header['quantize_seconds']:.1f} s ({header['int8_mb']:.1f} MB)"
        )
    lines += [
        "",
        "| contender | texts/s (median) | all runs | peak RSS MB | vs pipeline | test accuracy | "
        "same label as pipeline | load |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        agree = sum(a == b for a, b in zip(r["labels"], reference["labels"])) / len(reference["labels"])
        r["agreement"] = agree
        runs_shown = ", ".join(f"{x:.1f}" for x in r["all_texts_s"])
        lines.append(
            f"| {r['variant']} | {r['texts_s']:.1f} | {runs_shown} | {r['peak_rss_mb']:.0f} | "
            f"{r['texts_s'] / reference['texts_s']:.2f}x | {r['accuracy']:.4f} | {100 * agree:.1f}% | "
            f"{r['load']:.1f} |"
        )
    lines += [
        "",
        '`llmtune` is `predict(texts, batch_size=64)` with its default precision ("auto": bf16 autocast '
        'on CPUs with native bf16 matmuls, as here); `llmtune-fp32` passes `precision="fp32"`. Both '
        "tokenize the whole list once and run batches in length order; the pipeline tokenizes and pads "
        "each batch of 64 in input order, in fp32. `onnx` / `onnx-int8` are `llmtune_onnx.load(dir)` / "
        "`load(dir, quantized=True)` with onnxruntime's CPU provider and `threads` intra-op threads, "
        "batches in length order; their processes import no torch. Times include tokenization.",
    ]
    if fp32 is not None:
        int8 = next((r for r in results if r["variant"] == "onnx-int8"), None)
        if int8 is not None:
            same = sum(a == b for a, b in zip(int8["labels"], fp32["labels"])) / len(fp32["labels"])
            lines += [
                "",
                f"int8 against fp32 onnxruntime: {int8['texts_s'] / fp32['texts_s']:.2f}x the speed, "
                f"test accuracy {int8['accuracy'] - fp32['accuracy']:+.4f} "
                f"({int8['accuracy']:.4f} vs {fp32['accuracy']:.4f}), "
                f"same label for {100 * same:.1f}% of the texts.",
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
