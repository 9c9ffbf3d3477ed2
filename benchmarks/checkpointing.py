"""Gradient checkpointing: the memory it saves and the time it costs, on a CPU.

Each row trains in a fresh process (peak RSS is its own): a random-weight model of
SmolLM2-135M's shape (Llama, 30 layers, hidden 576) or all-MiniLM-L6-v2's (BERT, 6 layers,
hidden 384), batches of 8 texts x 256 tokens, full fine-tuning or LoRA(r=8), with and
without `gradient_checkpointing=True`. Reported: peak RSS during training above the RSS
after loading (the activations and gradients a step holds), and seconds per step.

    python benchmarks/checkpointing.py            # ~5 min on 2 free cores
    python benchmarks/checkpointing.py --quick    # 2 layers, 2 steps

Writes benchmarks/results/checkpointing.md (--quick: runs/checkpointing-quick.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, random, sys, threading, time
import psutil, torch
sys.path.insert(0, {root!r} + "/tests")
from conftest import build_tokenizer
from transformers import AutoConfig, AutoModel
from llmtune import ClassifierModel, DatasetAdapter, FineTuner, LoRA

shape, tune, ckpt, layers, steps = {shape!r}, {tune!r}, {ckpt!r}, {layers!r}, {steps!r}
tokenizer = build_tokenizer()
if shape == "smollm2":
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=layers or 30, num_attention_heads=9, num_key_value_heads=3, pad_token_id=0,
        max_position_embeddings=2048, tie_word_embeddings=True)
else:
    config = AutoConfig.for_model("bert", vocab_size=30522, hidden_size=384, intermediate_size=1536,
        num_hidden_layers=layers or 6, num_attention_heads=12, max_position_embeddings=512)
torch.manual_seed(0)
encoder = AutoModel.from_config(config)
model = ClassifierModel(encoder, tokenizer, labels=["a", "b"], max_length=256, gradient_checkpointing=ckpt)
if tune == "lora":
    model.tune(LoRA(r=8))
rng = random.Random(0)
words = ["good", "bad", "film", "plot", "acting", "story", "the", "very", "and", "music"]
texts = [" ".join(rng.choices(words, k=400)) for _ in range(8 * steps)]  # truncated to 256 tokens
data = DatasetAdapter.from_lists(texts, ["a", "b"] * (4 * steps))
data.tokenize(tokenizer, 256)
process = psutil.Process()
base = process.memory_info().rss
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
tuner = FineTuner(model, epochs=1, batch_size=8, progress=False, keep_best=False, group_by_length=False)
start = time.perf_counter()
tuner.fit(data)
seconds = (time.perf_counter() - start) / steps
stop.set()
print(json.dumps({{"peak_mb": (peak[0] - base) / 2**20, "s_per_step": seconds}}))
"""


def run(shape: str, tune: str, ckpt: bool, layers: int | None, steps: int) -> dict:
    code = CHILD.format(root=str(ROOT), shape=shape, tune=tune, ckpt=ckpt, layers=layers, steps=steps)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 steps")
    args = parser.parse_args(argv)
    layers, steps = (2, 2) if args.quick else (None, 4)
    lines = [
        "| model shape | training | peak RSS above load, plain | with checkpointing | saved | s/step plain | "
        "s/step checkpointing |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in ("smollm2", "minilm"):
        for tune in ("full", "lora"):
            plain, ckpt = (run(shape, tune, c, layers, steps) for c in (False, True))
            saved = 1 - ckpt["peak_mb"] / plain["peak_mb"]
            lines.append(
                f"| {shape} | {tune} | {plain['peak_mb']:.0f} MB | {ckpt['peak_mb']:.0f} MB | {saved:.0%} | "
                f"{plain['s_per_step']:.2f} | {ckpt['s_per_step']:.2f} |"
            )
            print(lines[-1], flush=True)
    out = ROOT / ("runs/checkpointing-quick.md" if args.quick else "benchmarks/results/checkpointing.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "Batches of 8 x 256 tokens, bf16 autocast where the CPU has it; fresh process per row.\n\n"
    out.write_text(f"# Gradient checkpointing on a CPU\n\n{header}" + "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
