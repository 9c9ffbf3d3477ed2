"""Train a tiny model under torchrun (or alone) and write its weights and metrics for a test.

torchrun --nproc_per_node=2 tests/ddp_script.py MODEL_DIR OUT_DIR --batch-size 4
python tests/ddp_script.py MODEL_DIR OUT_DIR --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import sentiment_texts  # noqa: E402

from llmtune import (  # noqa: E402
    Checkpoint,
    ClassifierModel,
    DatasetAdapter,
    FineTuner,
    Objective,
    OptimizerFactory,
    TrainingError,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--tuning", default="full", choices=["full", "head", "lora"])
    parser.add_argument("--init-group", default=None, help="start the process group first, e.g. cuda:gloo")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--nan-at", default=None, help="RANK:CALL: that rank's CALL-th forward gives NaN")
    parser.add_argument("--nonfinite", default="raise")
    parser.add_argument("--probe", action="store_true", help="fit the head on frozen features first")
    parser.add_argument("--unknown", action="store_true", help="text the tokenizer cannot read: fit grows it")
    parser.add_argument("--class-weights", action="store_true", help="weighted cross-entropy (3 to 1)")
    args = parser.parse_args()

    if args.init_group:
        # As a user's script would: a group whose backend serves only CUDA tensors (NCCL's
        # case, simulated by "cuda:gloo" on a CPU machine), started before llmtune sees it.
        torch.distributed.init_process_group(args.init_group)

    texts, labels = sentiment_texts(70, seed=1)
    if args.unknown:  # the label in characters the tokenizer reads as [UNK] only
        texts = [f"{t} {'好极了' if y == 'pos' else '差极了'}" for t, y in zip(texts, labels, strict=True)]
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.2, seed=0)
    torch.manual_seed(0)  # the same head on every rank and in the single-process run
    model = ClassifierModel.from_pretrained(args.model_dir, labels=train.labels)
    if args.tuning != "full":
        from llmtune import HeadOnly, LoRA

        model.tune(HeadOnly() if args.tuning == "head" else LoRA(r=4, alpha=8, dropout=0.0))
    out = Path(args.out)
    if args.nan_at:
        rank, call = map(int, args.nan_at.split(":"))
        calls = []

        def poison(module, inputs, output):
            calls.append(1)
            if int(os.environ.get("RANK", "0")) == rank and len(calls) == call:
                return output * float("nan")
            return None

        model.head.register_forward_hook(poison)
    tuner = FineTuner(
        model,
        # SGD: Adam divides by sqrt(v) and magnifies float-summation-order noise in tiny gradients.
        optimizer=OptimizerFactory.sgd(lr=0.05),
        objective=Objective.cross_entropy(class_weights=[3.0, 1.0]) if args.class_weights else None,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        precision=args.precision,
        nonfinite=args.nonfinite,
        probe=args.probe or None,
        progress=True,  # the bar lives on rank 0 only; this runs that path on every rank
        keep_best=False,
        callbacks=[Checkpoint(out / "ckpt", every_n_steps=3, keep_last=None)],
    )
    try:
        history = tuner.fit(train, val, resume_from=args.resume)
    except TrainingError as err:
        rank = os.environ.get("RANK", "0")
        (out / f"error.rank{rank}").write_text(str(err))
        return
    metrics = tuner.evaluate(val)
    if tuner.is_main:
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, out / "weights.safetensors")
        result = {"metrics": metrics, "history": history.records, "probe": tuner.probe_metrics}
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    finally:
        # Whoever starts a group closes it; gloo aborts at exit now and then otherwise (CI
        # saw "terminate called without an active exception" after a finished run).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
