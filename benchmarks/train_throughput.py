"""Training throughput: llmtune's FineTuner against the Hugging Face Trainer, side by side.

Same encoder (all-MiniLM-L6-v2), same data and held-out split, one epoch, batch 32, the same
learning rate and thread count. Each contender trains in a fresh Python process, so its peak
RSS is its own. Two data sets: real tweets (short) and a synthetic set with a long-tailed
length distribution (most texts ~15 words, a few up to max_length). Run from the repo root:

    python benchmarks/train_throughput.py            # 2 x 2,048 examples, 3 runs each: ~20 min
    python benchmarks/train_throughput.py --quick --repeat 1  # 2-layer encoder, 400 examples: ~1 min
    python benchmarks/train_throughput.py --variants llmtune,llmtune-fp32,llmtune-fused  # ablations
    python benchmarks/train_throughput.py --decoder --sets tweets   # SmolLM2-135M + LoRA vs Trainer + peft

`--lora R` trains LoRA adapters of rank R (alpha 2R, dropout 0.1, each family's default
targets: q_proj and v_proj for Llama) on both sides: llmtune's `LoRA` and peft's
`get_peft_model(LoraConfig(task_type="SEQ_CLS"))` on the Trainer's model. `--decoder` is
SmolLM2-135M-Instruct (llmtune.offline) with `--lora 8`, LR 5e-4, max_length 64, batch 16.

Contenders (`--variants`): llmtune (FineTuner defaults: length-grouped batches, bf16 autocast
where the CPU runs bf16 natively, head LR 1e-3, CPU fast paths), llmtune-nofast (the same with
`fast_cpu=False`: torch's own dropout and embedding-gradient kernels), hf-default (Trainer defaults,
DataCollatorWithPadding), hf-best (Trainer + train_sampling_strategy="group_by_length" + bf16);
ablations: llmtune-fp32, llmtune-nogroup, llmtune-loop (for-loop AdamW), llmtune-foreach,
llmtune-noguard, llmtune-longfirst, llmtune-pad32, llmtune-compile, hf-group, hf-bf16.

Model FLOPs per training example: 6 x non-embedding parameters x tokens + 12 x layers x hidden
x tokens^2 (attention scores and values, forward and backward), counted on real (non-pad)
tokens; "padded" counts the shapes the hardware computed. MFU divides by the machine's peak
matmul FLOP/s, measured in the same run (2048^3 matmul, bf16 or fp32 as the run computes).
Writes benchmarks/results/train.{md,json} (--quick: runs/train-quick.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "examples"))  # the example's tweet loader and encoder path

MAIN = ("llmtune", "llmtune-nofast", "hf-default", "hf-best")
SETS = ("tweets", "longtail")


# -- data -------------------------------------------------------------------------------


def longtail_texts(size: int, seed: int, vocab: list[str]) -> tuple[list[str], list[str]]:
    """Binary 'sentiment' texts of filler words with 1-3 cue words; lengths long-tailed (lognormal)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cues = {
        "positive": ["great", "excellent", "wonderful", "happy", "love", "perfect", "amazing", "fantastic"],
        "negative": ["terrible", "awful", "horrible", "sad", "hate", "broken", "worst", "disappointing"],
    }
    banned = {w for ws in cues.values() for w in ws}
    words = [w for w in vocab if w not in banned]
    texts, labels = [], []
    for _ in range(size):
        label = "positive" if rng.random() < 0.5 else "negative"
        n = int(np.clip(rng.lognormal(np.log(14), 0.8), 3, 300))
        row = list(rng.choice(words, n))
        for _ in range(rng.integers(1, 4)):
            row.insert(int(rng.integers(0, len(row) + 1)), str(rng.choice(cues[label])))
        texts.append(" ".join(row))
        labels.append(label)
    return texts, labels


def filler_vocab(tokenizer: Any) -> list[str]:
    """Whole lowercase words of the tokenizer's vocabulary (one token each), in a fixed order."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return [w for w, _ in vocab if w.isalpha() and w.isascii() and w.islower() and len(w) >= 3][:5000]


def load_split(args: argparse.Namespace, which: str, tokenizer: Any) -> tuple[Any, Any]:
    """(train, test) DatasetAdapters; every contender builds the same ones from the same seed."""
    from llmtune import DatasetAdapter

    if which == "tweets":
        from sentiment import load_tweets

        data = load_tweets(args.size, args.seed)
    else:
        texts, labels = longtail_texts(args.size, args.seed, filler_vocab(tokenizer))
        data = DatasetAdapter.from_lists(texts, labels, source="long-tailed synthetic")
    return data.split(validation=0.2, seed=args.seed)


# -- one contender, in its own process ----------------------------------------------------


class ShapeLog:
    """Forward pre-hook: (rows, padded width, real tokens, sum of squared lengths) per training batch."""

    def __init__(self, module: Any) -> None:
        self.batches: list[tuple[int, int, int, int]] = []
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:
            lengths = mask.sum(1)
            self.batches.append(
                (mask.shape[0], mask.shape[1], int(lengths.sum()), int((lengths * lengths).sum()))
            )


def non_embedding_params(model: Any) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def run_llmtune(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    import llmtune._guard
    from llmtune import ClassifierModel, FineTuner, OptimizerFactory
    from llmtune._batching import Tokenized

    train, test = load_split(args, args.set, AutoTokenizer.from_pretrained(args.model))
    model = ClassifierModel.from_pretrained(
        args.model, labels=train.labels, max_length=args.max_length, **args.extra
    )
    options = {"llmtune-loop": {"fused": False}, "llmtune-foreach": {"foreach": True}}.get(variant, {})
    if variant == "llmtune-noguard":  # the NaN guard's one .item() per step, switched off
        llmtune._guard.check_finite = lambda *a, **k: True
    if variant == "llmtune-longfirst":  # the longest batch first, as HF's LengthGroupedSampler does
        import llmtune._batching as batching

        grouped = batching.length_grouped_order

        def longest_first(lengths: Any, batch_size: int, rng: Any, mega: int = 50) -> list:
            batches = grouped(lengths, batch_size, rng, mega)
            top = max(range(len(batches)), key=lambda i: lengths[batches[i]].max())
            return [batches[top], *batches[:top], *batches[top + 1 :]]

        batching.length_grouped_order = longest_first
    if variant in ("llmtune-pad32", "llmtune-compile"):  # pad widths to a multiple of 32
        collate = Tokenized.collate

        def bucketed(self: Tokenized, indices: Any) -> dict:
            batch = collate(self, indices)
            extra = -batch["input_ids"].shape[1] % 32
            pads = {"input_ids": self.pad_id}
            return {
                k: torch.nn.functional.pad(v, (0, extra), value=pads.get(k, 0)) if v.dim() == 2 else v
                for k, v in batch.items()
            }

        Tokenized.collate = bucketed
    if variant == "llmtune-compile":
        model.encoder = torch.compile(model.encoder, dynamic=False)
    if args.lora:
        from llmtune import LoRA

        model.tune(LoRA(r=args.lora, alpha=2 * args.lora, dropout=0.1))
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=args.lr, options=options),
        epochs=1,
        batch_size=args.batch_size,
        precision="fp32" if variant == "llmtune-fp32" else "auto",
        seed=args.seed,
        progress=False,
        keep_best=False,
        group_by_length=variant != "llmtune-nogroup",
        fast_cpu=variant != "llmtune-nofast",  # torch's own dropout and embedding-gradient kernels
    )
    train.tokenize(model.tokenizer, model.max_length)  # both sides tokenize before the clock starts
    shapes = ShapeLog(model)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    tuner.fit(train)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = tuner.evaluate(test)["accuracy"]
    return {
        "train_s": train_s,
        "eval_s": time.perf_counter() - start,
        "accuracy": accuracy,
        "rss_before_mb": rss_before,
        "bf16": tuner.dtype == torch.bfloat16,
        "batches": shapes.batches,
        "params": non_embedding_params(model),
        "config": model.encoder.config,
        "train": len(train),
        "test": len(test),
    }


def run_hf(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    import numpy as np
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train, test = load_split(args, args.set, tokenizer)

    def encode(adapter: Any) -> Dataset:
        rows = Dataset.from_dict({"text": adapter.dataset["text"], "label": adapter.dataset["label"]})
        return rows.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
            batched=True,
            remove_columns=["text"],
        )

    train_ds, test_ds = encode(train), encode(test)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(train.labels), **args.extra
    )
    if tokenizer.pad_token is None:  # decoders: batches > 1 need a pad token (transformers #34055)
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.lora:
        from peft import LoraConfig, get_peft_model

        from llmtune._families import family

        targets = list(family(model.config).lora_targets)  # the targets llmtune's LoRA() picks
        config = LoraConfig(
            task_type="SEQ_CLS",
            r=args.lora,
            lora_alpha=2 * args.lora,
            lora_dropout=0.1,
            target_modules=targets,
        )
        model = get_peft_model(model, config)  # SEQ_CLS: the classification head trains too
    best = variant in ("hf-best", "hf-bf16")
    grouped = variant in ("hf-best", "hf-group")
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        use_cpu=True,
        bf16=best,
        train_sampling_strategy="group_by_length" if grouped else "random",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    shapes = ShapeLog(model)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    out = trainer.predict(test_ds)
    accuracy = float((np.argmax(out.predictions, -1) == out.label_ids).mean())
    return {
        "train_s": train_s,
        "eval_s": time.perf_counter() - start,
        "accuracy": accuracy,
        "rss_before_mb": rss_before,
        "bf16": best,
        "batches": shapes.batches,
        "params": non_embedding_params(model),
        "config": model.config,
        "train": len(train_ds),
        "test": len(test_ds),
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.extra = {"num_hidden_layers": 2} if args.quick else {}
    run = run_llmtune if args.variant.startswith("llmtune") else run_hf
    result = run(args, args.variant)
    config, batches = result.pop("config"), result.pop("batches")
    layers, hidden, n = config.num_hidden_layers, config.hidden_size, result["params"]
    tokens = sum(b[2] for b in batches)
    padded = sum(b[0] * b[1] for b in batches)
    # Forward 2N, input gradients 2N, weight gradients 2N, except that LoRA's frozen weights
    # get none (the adapters' own FLOPs are under 1% at r=8).
    weight_flops = 4 if args.lora else 6
    attention = 12 * layers * hidden
    result.update(
        variant=args.variant,
        set=args.set,
        steps=len(batches),
        tokens=tokens,
        pad_fraction=1 - tokens / padded,
        flops=weight_flops * n * tokens + attention * sum(b[3] for b in batches),
        padded_flops=weight_flops * n * padded + attention * sum(b[0] * b[1] ** 2 for b in batches),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        load=os.getloadavg()[0],
        threads=torch.get_num_threads(),
    )
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent: peak FLOP/s, contenders back to back, table ------------------------------


def peak_matmul(threads: int, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` FLOP/s of an n x n x n matmul in fp32 and bf16 (what the run's precision can reach)."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up (oneDNN primitive creation)
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2 * n**3 / best
    return peaks


def run_child(args: argparse.Namespace, variant: str, which: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--set", which, "--size", str(args.size)]
    cmd += ["--lr", str(args.lr), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads), "--model", args.model]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--lora", str(args.lora)] if args.lora else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{variant} on {which} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_s"] = time.perf_counter() - start
    return result


def derive(r: dict[str, Any], peaks: dict[str, float]) -> None:
    peak = peaks["bf16" if r["bf16"] else "fp32"]
    r["samples_s"] = r["train"] / r["train_s"]
    r["tokens_s"] = r["tokens"] / r["train_s"]
    r["tflops"] = r["flops"] / r["train_s"] / 1e12
    r["mfu"] = r["flops"] / r["train_s"] / peak
    r["padded_mfu"] = r["padded_flops"] / r["train_s"] / peak


def paired_ratios(ours: dict[str, Any], other: dict[str, Any]) -> list[float]:
    """llmtune's samples/s over `other`'s, round by round (runs of one round are adjacent)."""
    return [a / b for a, b in zip(ours["all_samples_s"], other["all_samples_s"])]


def table(results: list[dict[str, Any]], header: dict[str, Any]) -> str:
    peaks = header["peaks"]
    lines = [
        "# Training throughput: llmtune FineTuner vs transformers Trainer",
        "",
        f"- command: `{header['command']}`",
        f"- date: {header['date']}; machine: {header['machine']}",
        f"- load average (1, 5, 15 min) before / after: {header['load_before']} / {header['load_after']}",
        f"- peak matmul (2048^3, best of 5, same run): fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s",
        f"- {header['setup']}",
        "",
        "| set | contender | samples/s | tokens/s | train s | pad % | peak RSS MB | test acc "
        "| model TFLOP/s | MFU % | padded MFU % | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['set']} | {r['variant']} | {r['samples_s']:.1f} | {r['tokens_s']:,.0f} | "
            f"{r['train_s']:.1f} | {100 * r['pad_fraction']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['accuracy']:.3f} | {r['tflops']:.3f} | {100 * r['mfu']:.1f} | "
            f"{100 * r['padded_mfu']:.1f} | {r['load']:.1f} |"
        )
    if any(len(r.get("all_samples_s", [])) > 1 for r in results):
        lines += [
            "",
            "Each row is the median of interleaved runs; samples/s of every run:",
            "",
            *[f"- {r['set']} {r['variant']}: {', '.join(map(str, r['all_samples_s']))}" for r in results],
        ]
    ours = {r["set"]: r for r in results if r["variant"] == "llmtune"}
    ratios = []
    for r in results:
        base = ours.get(r["set"])
        if base is not None and r is not base:
            rounds = paired_ratios(base, r)
            ratios.append(
                f"| {r['set']} | llmtune / {r['variant']} | {base['samples_s'] / r['samples_s']:.2f}x | "
                f"{statistics.median(rounds):.2f}x ({', '.join(f'{x:.2f}' for x in rounds)}) | "
                f"{base['peak_rss_mb'] / r['peak_rss_mb']:.2f}x | {base['accuracy'] - r['accuracy']:+.3f} |"
            )
    if ratios:
        lines += [
            "",
            "| set | ratio | samples/s (medians) | samples/s, median of rounds (each round) | peak RSS "
            "| accuracy difference |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            *ratios,
            "",
            "A round runs every contender once, back to back, so its ratio compares runs a minute "
            "apart; the median of the rounds' ratios is the paired figure, the ratio of medians "
            "the unpaired one.",
        ]
    lines += [
        "",
        "samples/s and tokens/s are over `fit` / `trainer.train()` only (tokenization and model loading "
        "excluded, the same for both); tokens are non-pad tokens. 'pad %' is the share of padded "
        "positions in the training batches. Peak RSS is the contender's own process (ru_maxrss, "
        "including loading and evaluation). MFU uses the real tokens' FLOPs; 'padded MFU' counts the "
        "padded shapes that were computed. 'load' is the 1-minute load average at the end of the "
        "row: 2 is this benchmark alone on 2 cores, more means other jobs shared the CPU.",
    ]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--size", type=int, default=2048, help="examples per set (80%% train, 20%% test)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per contender, interleaved; the median run is reported"
    )
    parser.add_argument("--variants", default=",".join(MAIN))
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--out", default=None, help="output path stem (default benchmarks/results/train)")
    parser.add_argument("--quick", action="store_true", help="2-layer encoder, 400 examples per set")
    parser.add_argument("--lora", type=int, default=0, help="train LoRA adapters of this rank (0: full)")
    parser.add_argument(
        "--decoder", action="store_true", help="SmolLM2-135M-Instruct + LoRA r8, LR 5e-4, batch 16, length 64"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.child is None:
        args.size = 400
    if args.decoder and args.child is None:
        from llmtune import offline

        args.model = offline.model_path("SmolLM2-135M-Instruct")
        args.lora, args.lr, args.batch_size, args.max_length = args.lora or 8, 5e-4, 16, 64
        args.size = 640 if args.size == 2048 else args.size
    if args.model is None:
        from sentiment import default_model

        args.model = default_model()
    if args.child is not None:
        args.variant = args.child
        child(args)
        return []

    default = args.variants == ",".join(MAIN) and args.sets == ",".join(SETS)
    stem = Path(args.out or ("runs/train-quick" if args.quick else HERE / "results" / "train"))
    if args.decoder and args.out is None:
        stem = Path("runs/train-decoder-quick" if args.quick else HERE / "results" / "train_decoder")
    elif not default and args.out is None:
        stem = Path("runs/train-variants")
    stem.parent.mkdir(parents=True, exist_ok=True)
    command = ["python", "benchmarks/train_throughput.py", *(sys.argv[1:] if argv is None else argv)]
    header: dict[str, Any] = {
        "command": shlex.join(command),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "peaks": peak_matmul(args.threads),
        "setup": (
            f"{'2-layer ' if args.quick else ''}{Path(args.model).name}"
            f"{f' + LoRA r{args.lora}' if args.lora else ''}, {args.size} examples per set "
            f"(80/20 train/test), max_length {args.max_length}, one epoch, batch {args.batch_size}, "
            f"LR {args.lr:g} linear decay, no warmup, {args.threads} threads; each contender in its "
            f"own process, {args.repeat} interleaved run(s) each, median reported"
        ),
    }
    results = []
    variants = args.variants.split(",")
    for which in args.sets.split(","):
        # Interleaved repeats (A B C, A B C, ...): load drifts over minutes on a shared machine,
        # so each contender's median run is compared, not single runs minutes apart.
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(args.repeat):
            for variant in variants:
                result = run_child(args, variant, which)
                derive(result, header["peaks"])
                runs[variant].append(result)
                print(
                    f"{which:8s} {variant:16s} {result['samples_s']:6.1f} samples/s  "
                    f"acc {result['accuracy']:.3f}  RSS {result['peak_rss_mb']:.0f} MB  "
                    f"(before fit {result['rss_before_mb']:.0f})  MFU {100 * result['mfu']:.1f}%  "
                    f"pad {100 * result['pad_fraction']:.0f}%  load {result['load']:.1f}",
                    flush=True,
                )
        for variant in variants:
            median = sorted(runs[variant], key=lambda r: r["samples_s"])[(len(runs[variant]) - 1) // 2]
            median["all_samples_s"] = [round(r["samples_s"], 1) for r in runs[variant]]
            median["all_peak_rss_mb"] = [round(r["peak_rss_mb"]) for r in runs[variant]]
            results.append(median)
    header["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    markdown = table(results, header)
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=2))
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    return results


if __name__ == "__main__":
    main()
