"""Why is llmtune's first GPU run a few times slower than its second? One variant a process.

The H200 check saw MiniLM bf16 at 311 samples/s in a process's first run and 1,518 in the
second, with the same number of cudaMalloc calls: not allocator growth. Each variant here
runs in a fresh process (kernels and plans loaded once stay loaded), cold then warm:

- exact: batches padded to their longest example (up to 128 distinct widths);
- pad8: widths rounded up to a multiple of 8 (16 distinct widths), what llmtune now does on
  CUDA (`_runtime.pad_multiple`);
- no-cudnn-sdpa: exact widths, scaled_dot_product_attention without its cuDNN backend;
- eager-modules: exact widths, CUDA_MODULE_LOADING=EAGER (all kernels loaded up front);
- pad8+no-cudnn-sdpa: both.

The recorded runs kept the names they were made with: in `results/gpu/h200-coldstart.json`
"default" is today's "exact" (llmtune before the change), in `h200-coldstart-library.json`
"default" is llmtune after it (today's "pad8").

    python benchmarks/gpu_coldstart.py --out runs/coldstart   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("exact", "pad8", "no-cudnn-sdpa", "eager-modules", "pad8+no-cudnn-sdpa")


def child(variant: str, examples: int, device: str) -> dict[str, float]:
    sys.path.insert(0, str(HERE))
    import gpu_check
    import torch

    from llmtune import _runtime

    multiple = 8 if "pad8" in variant else 1
    _runtime.pad_multiple = lambda device: multiple  # the one switch llmtune's padding reads
    if "no-cudnn-sdpa" in variant:
        torch.backends.cuda.enable_cudnn_sdp(False)
    data = gpu_check.Data.make(examples)
    shape = gpu_check.SHAPES["minilm"]
    result = {}
    for run in ("cold", "warm"):
        start = time.perf_counter()
        r = gpu_check.rates(gpu_check.run_llmtune(data, shape, "bf16", device), data, 1)
        result[run] = r["samples_s"]
        result[f"{run}_call_s"] = time.perf_counter() - start
        result[f"{run}_accuracy"] = r["accuracy"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/coldstart")
    parser.add_argument("--examples", type=int, default=10240)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.examples, args.device)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in args.variants.split(","):
        env = dict(os.environ)
        if variant == "eager-modules":
            env["CUDA_MODULE_LOADING"] = "EAGER"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--examples",
            str(args.examples),
            "--device",
            args.device,
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        results[variant] = json.loads(lines[-1][7:]) if lines else {"error": done.stderr[-1500:]}
        print(variant, results[variant], flush=True)
    (out / "coldstart.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
