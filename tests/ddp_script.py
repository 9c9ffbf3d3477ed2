"""Train a tiny model under torchrun (or alone) and write its weights and metrics for a test.

torchrun --nproc_per_node=2 tests/ddp_script.py MODEL_DIR OUT_DIR --batch-size 4
python tests/ddp_script.py MODEL_DIR OUT_DIR --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import sentiment_texts  # noqa: E402

from llmtune import Checkpoint, ClassifierModel, DatasetAdapter, FineTuner, OptimizerFactory  # noqa: E402


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
    args = parser.parse_args()

    texts, labels = sentiment_texts(70, seed=1)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.2, seed=0)
    torch.manual_seed(0)  # the same head on every rank and in the single-process run
    model = ClassifierModel.from_pretrained(args.model_dir, labels=train.labels)
    if args.tuning != "full":
        from llmtune import HeadOnly, LoRA

        model.tune(HeadOnly() if args.tuning == "head" else LoRA(r=4, alpha=8, dropout=0.0))
    out = Path(args.out)
    tuner = FineTuner(
        model,
        # SGD: Adam divides by sqrt(v) and magnifies float-summation-order noise in tiny gradients.
        optimizer=OptimizerFactory.sgd(lr=0.05),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        precision="fp32",
        progress=True,  # the bar lives on rank 0 only; this runs that path on every rank
        keep_best=False,
        callbacks=[Checkpoint(out / "ckpt", every_n_steps=3, keep_last=None)],
    )
    history = tuner.fit(train, val, resume_from=args.resume)
    metrics = tuner.evaluate(val)
    if tuner.is_main:
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, out / "weights.safetensors")
        (out / "result.json").write_text(json.dumps({"metrics": metrics, "history": history.records}))


if __name__ == "__main__":
    main()
