"""GPU check: one command that a bare GPU machine runs end to end in about 7 minutes.

    python3 benchmarks/gpu_check.py --out DIR                  # on the GPU machine (~7 min on an H200)
    python3 benchmarks/gpu_check.py --quick --out DIR          # fewer examples, one shape, 2 rounds
    python3 benchmarks/gpu_check.py --cpu-dry-run --out DIR    # the same code paths, tiny, on the CPU

Sections, in order; each is skipped with a note when the time budget (--budget) would run out:

1. tests: `pytest -m gpu tests/test_gpu.py`, its pass/fail summary.
2. finetune: random-weight encoders shaped like all-MiniLM-L6-v2 (6 x 384) and BERT-base
   (12 x 768), vocabulary 30,522, fine-tuned in bf16 and in fp16 on synthetic learnable text:
   samples/s, tokens/s, peak GPU memory, skipped steps, test accuracy.
3. torchrun: `python -m torch.distributed.run --nproc_per_node 1` through FineTuner (one process:
   llmtune stays out of torch.distributed), then the data-parallel code path itself (DDP wrap,
   all-reduces, gathers) on a one-rank process group: NCCL on a GPU, gloo on a CPU.
4. versus: FineTuner against transformers.Trainer + AutoModelForSequenceClassification, same
   shape, data, batch, max length and bf16 (Trainer with `bf16=True` and length-grouped
   batches), interleaved rounds in one process; medians and the paired ratio.

The text is made on the spot (pseudo-words, 1-3 cue words decide the label) with a WordPiece
tokenizer trained on it, so nothing comes from a hub. Writes DIR/gpu_check.json and .md.
Written for torch >= 2.4 and transformers >= 5.0 (the GPU machine may be older than this one).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the llmtune of this working tree

import torch  # noqa: E402

VOCAB = 30522
MAX_LENGTH = 128
BATCH = 32
LR = 1e-4  # random-weight encoders: higher than a fine-tune's 2e-5..5e-5, with 10% warmup
SHAPES = {
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
TINY = {  # --cpu-dry-run: the same two entries, small enough for two shared CPU cores
    "minilm": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128),
    "bert-base": dict(num_hidden_layers=2, hidden_size=96, num_attention_heads=4, intermediate_size=192),
}


@dataclass(frozen=True)
class Plan:
    """How much each section does: the full check, --quick, or --cpu-dry-run."""

    device: str
    examples: int  # 80% train, 20% test
    shapes: dict[str, dict[str, int]]
    finetune_epochs: int
    versus_shapes: tuple[str, ...]
    rounds: int
    budget_s: float

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        if args.cpu_dry_run:
            plan = cls("cpu", 320, TINY, 1, ("minilm",), 2, 1500.0)
        elif args.quick:
            plan = cls("cuda", 5120, SHAPES, 2, ("minilm",), 2, 180.0)
        else:
            plan = cls("cuda", 10240, SHAPES, 1, ("minilm", "bert-base"), 3, 420.0)
        return plan if args.budget is None else cls(**{**plan.__dict__, "budget_s": args.budget})


# -- time budget ---------------------------------------------------------------------------


class Clock:
    """The whole run's deadline; a part runs only if its estimate fits in what is left."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def allows(self, estimate_s: float, keep_s: float = 0.0) -> bool:
        """True if `estimate_s` fits and still leaves `keep_s` for the sections after this one."""
        return self.left() - keep_s >= estimate_s


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def gpu_memory(device: str, into: dict[str, Any]) -> Iterator[None]:
    """Peak GPU memory of the block (MiB), from a clean allocator; None on the CPU."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_accumulated_memory_stats()
    yield
    into["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    if device == "cuda":  # cudaMalloc calls in the block: allocator growth, a first-run cost
        into["cuda_mallocs"] = torch.cuda.memory_stats().get("segment.all.allocated", 0)


# -- data ------------------------------------------------------------------------------------


def synthetic_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Pseudo-word texts of long-tailed length; 1-3 cue words from one of two sets give the label."""
    words = random.Random(1234)  # the same vocabulary in every process
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

    def word() -> str:
        return "".join(words.choice(syllables) for _ in range(words.randint(1, 3)))

    cues = {"pos": [word() + "x" for _ in range(8)], "neg": [word() + "q" for _ in range(8)]}
    filler = sorted({word() for _ in range(3000)})
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = "pos" if rng.random() < 0.5 else "neg"
        row = rng.choices(filler, k=int(min(max(rng.lognormvariate(math.log(20), 0.7), 3), 100)))
        for _ in range(rng.randint(1, 3)):
            row.insert(rng.randint(0, len(row)), rng.choice(cues[label]))
        texts.append(" ".join(row))
        labels.append(label)
    return texts, labels


def wordpiece_tokenizer(corpus: list[str]) -> Any:
    """A BERT-style WordPiece tokenizer trained on `corpus` (as tests/conftest.py builds one)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_LENGTH,
    )


@dataclass
class Data:
    tokenizer: Any
    train: Any  # DatasetAdapter
    test: Any
    train_tokens: int  # non-pad tokens in one epoch, after truncation

    @classmethod
    def make(cls, examples: int) -> Data:
        from llmtune import DatasetAdapter

        texts, labels = synthetic_texts(examples)
        tokenizer = wordpiece_tokenizer(texts[:3000])
        train, test = DatasetAdapter.from_lists(texts, labels, source="synthetic").split(0.2, seed=0)
        tokens = int(train.tokenize(tokenizer, MAX_LENGTH).lengths.sum())
        test.tokenize(tokenizer, MAX_LENGTH)
        return cls(tokenizer, train, test, tokens)


def bert_config(shape: dict[str, int], tokenizer: Any, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, **shape, **extra
    )


# -- one training run each way -------------------------------------------------------------


class Bracket:
    """Seconds between the loop's first and last event, synchronised: setup (sampler, optimizer) excluded."""

    def __init__(self, device: str) -> None:
        self.device, self.begin, self.end = device, 0.0, 0.0

    def open(self) -> None:
        sync(self.device)
        self.begin = time.perf_counter()

    def close(self) -> None:
        sync(self.device)
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.begin


def run_llmtune(
    data: Data,
    shape: dict[str, int],
    precision: str,
    device: str,
    epochs: int = 1,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """FineTuner with its defaults but for the precision: length-grouped batches, head LR 1e-3."""
    from transformers import BertModel

    from llmtune import Callback, ClassifierModel, FineTuner, OptimizerFactory

    bracket = Bracket(device)

    class Timer(Callback):
        def on_fit_start(self, tuner: Any, state: Any, **kwargs: Any) -> None:
            bracket.open()

        def on_fit_end(self, tuner: Any, state: Any, **kwargs: Any) -> None:
            bracket.close()

    torch.manual_seed(0)
    encoder = BertModel(bert_config(shape, data.tokenizer), add_pooling_layer=False)
    model = ClassifierModel(encoder, data.tokenizer, labels=data.train.labels, max_length=MAX_LENGTH)
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=LR, warmup=0.1),
        epochs=epochs,
        max_steps=max_steps,
        batch_size=BATCH,
        precision=precision,
        device=device,
        progress=False,
        keep_best=False,
        callbacks=[Timer()],
    )
    result: dict[str, Any] = {}
    with gpu_memory(device, result):
        start = time.perf_counter()
        history = tuner.fit(data.train)
        sync(device)
        result["call_s"] = time.perf_counter() - start
    result.update(
        loop_s=bracket.seconds,
        steps=tuner.state.step,
        skipped=tuner.state.skipped,
        dtype=str(tuner.dtype).replace("torch.", "") if tuner.dtype is not None else "fp32",
        train_loss=history.train_loss,
        accuracy=tuner.evaluate(data.test)["accuracy"],
    )
    del tuner, model, encoder
    return result


def run_trainer(
    data: Data, shape: dict[str, int], device: str, max_steps: int | None = None
) -> dict[str, Any]:
    """transformers.Trainer in bf16 with length-grouped batches, otherwise as llmtune's run is set up."""
    import datasets
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    bracket = Bracket(device)

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            bracket.open()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            bracket.close()

    def encode(adapter: Any) -> Any:
        rows = Dataset.from_dict({"text": adapter.dataset["text"], "label": adapter.dataset["label"]})
        return rows.map(
            lambda b: data.tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH),
            batched=True,
            remove_columns=["text"],
        )

    train, test = encode(data.train), encode(data.test)
    torch.manual_seed(0)
    config = bert_config(shape, data.tokenizer, num_labels=len(data.train.labels))
    model = AutoModelForSequenceClassification.from_config(config)
    fields = TrainingArguments.__dataclass_fields__
    # transformers 5 spells length grouping train_sampling_strategy; earlier, group_by_length.
    grouping = (
        {"train_sampling_strategy": "group_by_length"}
        if "train_sampling_strategy" in fields
        else {"group_by_length": True}
    )
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=1,
        max_steps=max_steps or -1,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=2 * BATCH,
        learning_rate=LR,
        warmup_steps=0.1,  # a float below 1 is a fraction of the steps, as llmtune's warmup=0.1
        weight_decay=0.01,  # llmtune's AdamW default (Trainer's is 0)
        max_grad_norm=1.0,
        bf16=True,
        use_cpu=device == "cpu",
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **grouping,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=data.tokenizer,
        data_collator=DataCollatorWithPadding(data.tokenizer),
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)
    result: dict[str, Any] = {}
    with gpu_memory(device, result):
        start = time.perf_counter()
        out = trainer.train()
        sync(device)
        result["call_s"] = time.perf_counter() - start
    predictions = trainer.predict(test)
    result.update(
        loop_s=bracket.seconds,
        steps=out.global_step,
        skipped=0,
        dtype="bfloat16",
        accuracy=float((predictions.predictions.argmax(-1) == predictions.label_ids).mean()),
    )
    del trainer, model
    return result


def rates(result: dict[str, Any], data: Data, epochs: int) -> dict[str, Any]:
    seconds = result["loop_s"]
    result["samples_s"] = len(data.train) * epochs / seconds
    result["tokens_s"] = data.train_tokens * epochs / seconds
    return result


# -- the sections ---------------------------------------------------------------------------


def child_env(plan: Plan) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    if plan.device == "cpu":
        env["LLMTUNE_GPU_TESTS_ON"] = "cpu"  # tests/test_gpu.py on the CPU, GPU-only parts skipped
    return env


def section_tests(plan: Plan, clock: Clock, out: Path) -> dict[str, Any]:
    xml = out / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"]
    cmd.append(f"--junitxml={xml}")
    # Half the budget stays for the other sections; the CPU dry run's tests are much slower.
    timeout = max(
        30.0, min(200.0 if plan.device == "cuda" else 0.5 * plan.budget_s, clock.left() - 0.5 * plan.budget_s)
    )
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=child_env(plan), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        tail = err.stdout or ""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"ok": False, "note": f"pytest ran past {timeout:.0f} s", "output_tail": tail[-3000:]}
    result: dict[str, Any] = {"returncode": done.returncode, "output_tail": done.stdout[-3000:]}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        result.update(counts)
        result["cases"] = []
        for case in suite.iter("testcase"):
            bad = case.find("failure")
            bad = bad if bad is not None else case.find("error")
            outcome = "skipped" if case.find("skipped") is not None else "passed"
            result["cases"].append(
                {
                    "name": case.get("name"),
                    "outcome": outcome if bad is None else "failed",
                    "message": " ".join((bad.get("message") or "").split())[:300] if bad is not None else "",
                }
            )
    result["ok"] = done.returncode == 0
    return result


def section_finetune(plan: Plan, clock: Clock, data: Data) -> dict[str, Any]:
    runs, notes, took = [], [], {}  # took: seconds of the last run of each shape
    run_llmtune(data, plan.shapes["minilm"], "fp32", plan.device, max_steps=3)  # CUDA, cuBLAS warm-up
    for name, shape in plan.shapes.items():
        # bf16 twice: the first run meets every batch width for the first time (cuDNN
        # attention plans each one: benchmarks/gpu_coldstart.py), the second finds them warm.
        for precision in ("bf16", "bf16 again", "fp16"):
            if name in took:
                estimate = 1.3 * took[name]
            else:  # a BERT-base run takes about 3 MiniLM runs
                estimate = 1.3 * 3 * took["minilm"] if "minilm" in took else 10.0
            if not clock.allows(estimate, keep_s=0.45 * plan.budget_s):  # for sections 3 and 4
                notes.append(f"{name} {precision}: skipped, {clock.left():.0f} s left")
                continue
            start = time.perf_counter()
            try:  # one failing precision (an fp16 error, say) must not hide the other runs
                result = run_llmtune(data, shape, precision.split()[0], plan.device, plan.finetune_epochs)
            except Exception:
                notes.append(f"{name} {precision}: FAILED\n{traceback.format_exc()[-1500:]}")
                print(notes[-1], flush=True)
                continue
            took[name] = time.perf_counter() - start
            result = rates(result, data, plan.finetune_epochs)
            result.update(shape=name, precision=precision)
            runs.append(result)
            print(
                f"finetune {name:9s} {precision}: {result['samples_s']:8.1f} samples/s  "
                f"acc {result['accuracy']:.3f}  peak {fmt(result['peak_mem_mib'], '.0f')} MiB  "
                f"skipped {result['skipped']}  ({took[name]:.0f} s)",
                flush=True,
            )
    failed = any("FAILED" in n for n in notes)
    return {"ok": bool(runs) and not failed, "runs": runs, "notes": notes}


def section_torchrun(plan: Plan, clock: Clock, out: Path) -> dict[str, Any]:
    runs, notes = [], []
    for mode in ("plain", "one-rank-group"):
        timeout = min(90.0, clock.left() - 0.3 * plan.budget_s)  # the rest is section 4's
        if timeout < 20:
            notes.append(f"{mode}: skipped, {clock.left():.0f} s left")
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        cmd += [__file__, "--ddp-child", mode, "--out", str(out)]
        cmd += ["--cpu-dry-run"] if plan.device == "cpu" else []
        start = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, env=child_env(plan), capture_output=True, text=True, timeout=timeout
            )
            code, tail = done.returncode, (done.stdout + done.stderr)[-2500:]
        except subprocess.TimeoutExpired:
            code, tail = -1, f"ran past {timeout:.0f} s"
        report = out / f"ddp-{mode}.json"
        result = json.loads(report.read_text()) if code == 0 and report.is_file() else {}
        result.update(
            mode=mode, ok=code == 0 and bool(result), returncode=code, seconds=time.perf_counter() - start
        )
        if not result["ok"]:
            result["output_tail"] = tail
        runs.append(result)
        print(
            f"torchrun {mode}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s", flush=True
        )
    return {"ok": bool(runs) and all(r["ok"] for r in runs), "runs": runs, "notes": notes}


def ddp_child(args: argparse.Namespace) -> None:
    """Under torchrun: a few steps through FineTuner, then evaluate; rank 0 writes a JSON report.

    "one-rank-group" joins a process group of one rank and hands FineTuner a context that
    says "data parallel", so DDP's wrap and llmtune's all-reduces and gathers run for real:
    with one GPU that is the only way to run them through NCCL (NCCL refuses two ranks on
    one device).
    """
    import torch.distributed as dist

    import llmtune.distributed as lt_dist
    from llmtune import FineTuner, OptimizerFactory

    device = "cpu" if args.cpu_dry_run else "cuda"
    shapes = TINY if args.cpu_dry_run else SHAPES
    data = Data.make(320)
    if args.ddp_child == "one-rank-group":
        real_setup, context = lt_dist.setup, lt_dist.DistributedContext

        class OneRankGroup(context):  # type: ignore[misc, valid-type]
            @property
            def enabled(self) -> bool:
                return True

        def setup(dev: torch.device) -> tuple[Any, torch.device]:
            _, dev = real_setup(dev)  # WORLD_SIZE=1: no group, the device as it was
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if dev.type == "cuda":
                dev = torch.device("cuda", local)
                torch.cuda.set_device(dev)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            # The context names the device its collectives use: an NCCL group serves CUDA only.
            return OneRankGroup(int(os.environ.get("RANK", "0")), 1, local, dev), dev

        lt_dist.setup = setup
    from transformers import BertModel

    from llmtune import ClassifierModel

    torch.manual_seed(0)
    encoder = BertModel(bert_config(shapes["minilm"], data.tokenizer), add_pooling_layer=False)
    model = ClassifierModel(encoder, data.tokenizer, labels=data.train.labels, max_length=MAX_LENGTH)
    tuner = FineTuner(
        model,
        optimizer=OptimizerFactory.adamw(lr=LR),
        max_steps=6,
        batch_size=16,
        device=device,
        progress=False,
        keep_best=False,
        fast_cpu=False,  # the sparse embedding gradient is single-process only; on a GPU it is off anyway
    )
    tuner.fit(data.train)
    metrics = tuner.evaluate(data.test)  # predict gathers rows across ranks
    report = {
        "world_size": tuner.dist.world_size,
        "data_parallel": tuner.dist.enabled,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": str(tuner.device),
        "precision": str(tuner.dtype).replace("torch.", "") if tuner.dtype is not None else "fp32",
        "steps": tuner.state.step,
        "accuracy": metrics["accuracy"],
        "total_of_3": tuner.dist.total(3),
    }
    if tuner.is_main:
        (Path(args.out) / f"ddp-{args.ddp_child}.json").write_text(json.dumps(report))
    if args.ddp_child == "one-rank-group":
        dist.destroy_process_group()  # we opened it (llmtune closes only the groups it opens)


def section_versus(plan: Plan, clock: Clock, data: Data) -> dict[str, Any]:
    """Interleaved rounds (llmtune, Trainer, llmtune, Trainer...) per shape, in this process."""
    shapes, notes, round_s = [], [], 0.0
    for name in plan.versus_shapes:
        # A shape's warm-up and first round run unchecked: with BERT-base after MiniLM, about
        # 2.5 MiniLM rounds.
        if not clock.allows(2.5 * round_s if round_s else 20.0):
            notes.append(f"{name}: skipped, {clock.left():.0f} s left")
            continue
        try:
            shapes.append(versus_shape(plan, clock, data, name, notes))
            round_s = shapes[-1]["round_s"]
        except Exception:
            notes.append(f"{name}: FAILED\n{traceback.format_exc()[-1500:]}")
            print(notes[-1], flush=True)
    failed = any("FAILED" in n for n in notes)
    return {"ok": bool(shapes) and not failed, "shapes": shapes, "notes": notes}


def versus_shape(plan: Plan, clock: Clock, data: Data, name: str, notes: list[str]) -> dict[str, Any]:
    shape = plan.shapes[name]
    # Untimed warm-up of both: kernels, cuBLAS handles and autotuning for this shape.
    run_llmtune(data, shape, "bf16", plan.device, max_steps=5)
    run_trainer(data, shape, plan.device, max_steps=5)
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    round_s = 0.0
    for i in range(plan.rounds):
        if i and not clock.allows(1.2 * round_s):
            notes.append(f"{name}: stopped after {i} round(s), {clock.left():.0f} s left")
            break
        start = time.perf_counter()
        ours.append(rates(run_llmtune(data, shape, "bf16", plan.device), data, 1))
        theirs.append(rates(run_trainer(data, shape, plan.device), data, 1))
        round_s = time.perf_counter() - start
        print(
            f"versus {name:9s} round {i + 1}: llmtune {ours[-1]['samples_s']:8.1f}  "
            f"Trainer {theirs[-1]['samples_s']:8.1f} samples/s",
            flush=True,
        )
    paired = [a["samples_s"] / b["samples_s"] for a, b in zip(ours, theirs)]
    a, b = summary(ours), summary(theirs)
    return {
        "shape": name,
        "llmtune": a,
        "trainer": b,
        "ratio_of_medians": a["median_samples_s"] / b["median_samples_s"],
        "paired_ratio": statistics.median(paired),
        "rounds": paired,
        "round_s": round_s,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run (the lower middle one for an even count) with every run's samples/s."""
    median = sorted(runs, key=lambda r: r["samples_s"])[(len(runs) - 1) // 2]
    values = [r["samples_s"] for r in runs]
    return {
        **median,
        "median_samples_s": statistics.median(values),
        "all_samples_s": [round(x, 1) for x in values],
    }


# -- report -----------------------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def environment(plan: Plan) -> dict[str, Any]:
    import transformers

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": plan.device,
    }
    with contextlib.suppress(Exception):
        import datasets

        env["datasets"] = datasets.__version__
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_mem_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def markdown(report: dict[str, Any]) -> str:
    env, sections = report["environment"], report["sections"]
    lines = ["# GPU check", "", f"- command: `{report['command']}`"]
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines.append(f"- total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget")
    tests = sections.get("tests", {})
    lines += ["", "## 1. tests (`pytest -m gpu tests/test_gpu.py`)", ""]
    if "tests" in tests:
        lines.append(tests_line(tests))
        lines += [
            f"- {c['name']}: {c['outcome']} {c['message']}"
            for c in tests["cases"]
            if c["outcome"] != "passed"
        ]
    lines += note_lines(tests)
    finetune = sections.get("finetune", {})
    lines += ["", "## 2. fine-tune, random-weight encoders on synthetic text", ""]
    lines += [
        "| shape | precision | samples/s | tokens/s | peak GPU MiB | cudaMalloc calls | steps | skipped "
        "| test accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in finetune.get("runs", []):
        lines.append(
            f"| {r['shape']} | {r['precision']} | {r['samples_s']:.1f} | {r['tokens_s']:,.0f} | "
            f"{fmt(r['peak_mem_mib'], '.0f')} | {fmt(r.get('cuda_mallocs'), 'd')} | {r['steps']} | "
            f"{r['skipped']} | {r['accuracy']:.3f} |"
        )
    lines += note_lines(finetune)
    torchrun = sections.get("torchrun", {})
    lines += ["", "## 3. torchrun --nproc_per_node 1", ""]
    for r in torchrun.get("runs", []):
        detail = ", ".join(
            f"{k} {r[k]}" for k in ("backend", "data_parallel", "device", "steps", "total_of_3") if k in r
        )
        lines.append(f"- {r['mode']}: {'ok' if r['ok'] else 'FAILED'} ({detail})")
        if not r["ok"]:
            lines += ["", "```", r.get("output_tail", "")[-1500:], "```"]
    lines += note_lines(torchrun)
    versus = sections.get("versus", {})
    lines += ["", "## 4. llmtune vs transformers.Trainer (bf16, interleaved rounds)", ""]
    lines += [
        "| shape | llmtune samples/s (median; all) | Trainer samples/s (median; all) | ratio of medians "
        "| paired ratio (rounds) | peak GPU MiB llmtune / Trainer | accuracy llmtune / Trainer |",
        "| --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for s in versus.get("shapes", []):
        a, b = s["llmtune"], s["trainer"]
        rounds = ", ".join(f"{x:.2f}" for x in s["rounds"])
        memory = f"{fmt(a['peak_mem_mib'], '.0f')} / {fmt(b['peak_mem_mib'], '.0f')}"
        lines.append(
            f"| {s['shape']} | {a['median_samples_s']:.1f}; {a['all_samples_s']} "
            f"| {b['median_samples_s']:.1f}; {b['all_samples_s']} | {s['ratio_of_medians']:.2f}x "
            f"| {s['paired_ratio']:.2f}x ({rounds}) | {memory} | {a['accuracy']:.3f} / {b['accuracy']:.3f} |"
        )
    lines += note_lines(versus)
    lines += [
        "",
        "samples/s: training examples over the seconds between the loop's first and last event "
        "(FineTuner's on_fit_start/on_fit_end, Trainer's on_train_begin/on_train_end), GPU "
        "synchronised at both ends; model building and tokenization are outside. Trainer: "
        f"AutoModelForSequenceClassification (BERT pooler + linear), bf16=True, length-grouped "
        f"batches, fused AdamW (its default), the same LR {LR:g}, warmup 10%, weight decay 0.01, "
        f"clipping 1.0, batch {BATCH}, max_length {MAX_LENGTH}, DataCollatorWithPadding.",
    ]
    return "\n".join(lines) + "\n"


def note_lines(section: dict[str, Any]) -> list[str]:
    lines = []
    for note in section.get("notes", []):
        first, _, rest = note.partition("\n")  # a failure's traceback goes in a code block
        lines += [f"- note: {first}"] + (["", "```", rest, "```", ""] if rest else [])
    if section.get("note"):
        lines.append(f"- note: {section['note']}")
    if section.get("error"):
        lines += ["", "```", section["error"][-1500:], "```"]
    return lines


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; an exception becomes its report rather than the end of the check."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
        print(f"{name}: FAILED\n{result['error']}", flush=True)
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json/.md")
    parser.add_argument("--quick", action="store_true", help="half the data, the MiniLM shape only in versus")
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="tiny shapes on the CPU, to test this script"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 420)")
    parser.add_argument("--sections", default="tests,finetune,torchrun,versus")
    parser.add_argument("--ddp-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ddp_child:
        ddp_child(args)
        return 0
    plan = Plan.make(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-dry-run to test the script on the CPU", file=sys.stderr)
        return 2
    clock = Clock(plan.budget_s)
    print(json.dumps(environment(plan)), flush=True)  # first, so a log shows it whatever follows
    wanted = args.sections.split(",")
    report: dict[str, Any] = {
        "command": " ".join(
            ["python3", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "environment": environment(plan),
        "budget_s": plan.budget_s,
        "sections": {},
    }
    sections = report["sections"]
    if "tests" in wanted:
        sections["tests"] = guarded("tests", lambda: section_tests(plan, clock, out))
        print(f"tests: {tests_line(sections['tests'])}", flush=True)
    made = guarded("data", lambda: {"ok": True, "data": Data.make(plan.examples)})
    data = made.pop("data", None)
    if data is not None:
        report["data"] = {"train": len(data.train), "test": len(data.test), "train_tokens": data.train_tokens}
    else:
        sections["data"] = made  # without data (datasets missing, say) sections 2 and 4 cannot run
    if "finetune" in wanted and data is not None:
        sections["finetune"] = guarded("finetune", lambda: section_finetune(plan, clock, data))
    if "torchrun" in wanted:
        sections["torchrun"] = guarded("torchrun", lambda: section_torchrun(plan, clock, out))
    if "versus" in wanted and data is not None:
        sections["versus"] = guarded("versus", lambda: section_versus(plan, clock, data))
    report["seconds"] = plan.budget_s - clock.left()
    if plan.device == "cpu":
        report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    print(text)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(s.get("ok") for s in sections.values()) else 1


def tests_line(tests: dict[str, Any]) -> str:
    if "tests" not in tests:
        return "no result (" + (tests.get("note") or tests.get("error", "")[-200:]) + ")"
    counts = (tests["passed"], tests["failures"], tests["errors"], tests["skipped"])
    return "{} passed, {} failed, {} errors, {} skipped".format(*counts)


if __name__ == "__main__":
    sys.exit(main())
