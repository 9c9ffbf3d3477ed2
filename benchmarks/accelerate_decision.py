"""Build on accelerate? What it would cost llmtune, measured side by side in one run on the CPU.

    python benchmarks/accelerate_decision.py            # ~5 min on 2 cores
    python benchmarks/accelerate_decision.py --quick    # 2 repeats, 100 steps: a smoke run

1. Import time, each statement in a fresh process, statements interleaved, `--repeat` rounds:
   `import torch`, `import llmtune`, `import accelerate`, `from accelerate import Accelerator`,
   and `from accelerate import Accelerator` after `import llmtune` (what llmtune would add).
2. Install size: accelerate's installed files, and those of what it needs that llmtune's
   dependencies do not already bring (psutil).
3. Per-step cost: one process per (model, precision, repeat) trains two copies of the same
   model on the same batches, blocks of steps alternating: a plain torch loop (autocast,
   loss.backward(), optimizer.step()) and the same loop through `Accelerator.prepare(model,
   optimizer)` + `accelerator.backward(loss)` + the wrapped `optimizer.step()`. Models: a tiny
   BERT (2 layers, hidden 64) and a 2-layer MLP, whose step is so short that the wrapper's own
   Python time shows. fp32 and bf16 autocast. Reports median step times, the accelerate/plain
   ratio per process (paired) and the largest weight difference between the two copies.

Writes benchmarks/results/accelerate.{json,md} (--quick: runs/accelerate-quick.*).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

IMPORTS = {
    "import torch": ("", "import torch"),
    "import llmtune": ("", "import llmtune"),
    "import accelerate": ("", "import accelerate"),
    "from accelerate import Accelerator": ("", "from accelerate import Accelerator"),
    "from accelerate import Accelerator, after import llmtune": (
        "import llmtune",
        "from accelerate import Accelerator",
    ),
}
HEAVY = (
    "torch",
    "transformers",
    "datasets",
    "pandas",
    "pyarrow",
    "psutil",
    "yaml",
    "huggingface_hub",
    "accelerate",
)


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


# -- 1. import time ---------------------------------------------------------------------------


def time_import(setup: str, statement: str) -> dict[str, Any]:
    code = (
        f"import sys, time, json\n{setup}\nbefore = set(sys.modules)\n"
        f"t = time.perf_counter()\n{statement}\nt = time.perf_counter() - t\n"
        f"new = {{m.split('.')[0] for m in set(sys.modules) - before}}\n"
        f"print(json.dumps([t, sorted(new & set({list(HEAVY)!r}))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True)
    seconds, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "heavy": heavy}


def import_times(repeat: int) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in IMPORTS}
    for _ in range(repeat):  # interleaved: each round times every statement once
        for name, (setup, statement) in IMPORTS.items():
            runs[name].append(time_import(setup, statement))
    return [
        {
            "statement": name,
            "median_s": statistics.median(r["seconds"] for r in rs),
            "all_s": [round(r["seconds"], 3) for r in rs],
            "heavy_modules_loaded": rs[-1]["heavy"],
        }
        for name, rs in runs.items()
    ]


# -- 2. install size --------------------------------------------------------------------------


def installed_size(dist: str) -> dict[str, Any]:
    files = [f for f in importlib.metadata.files(dist) or [] if "__pycache__" not in str(f)]
    paths = [Path(f.locate()) for f in files]
    size = sum(p.stat().st_size for p in paths if p.is_file())
    lines = sum(len(p.read_bytes().splitlines()) for p in paths if p.suffix == ".py" and p.is_file())
    return {
        "dist": dist,
        "version": importlib.metadata.version(dist),
        "files": len(paths),
        "mb": size / 1e6,
        "python_lines": lines,
    }


def sizes() -> list[dict[str, Any]]:
    # accelerate needs huggingface_hub, numpy, packaging, psutil, pyyaml, safetensors and torch;
    # transformers (an llmtune dependency) already brings all of them but psutil.
    rows = [installed_size("accelerate"), installed_size("psutil")]
    llmtune = [p for p in (ROOT / "llmtune").glob("*.py")]
    rows.append(
        {
            "dist": "llmtune (this tree, for scale)",
            "version": "",
            "files": len(llmtune),
            "mb": sum(p.stat().st_size for p in llmtune) / 1e6,
            "python_lines": sum(len(p.read_bytes().splitlines()) for p in llmtune),
        }
    )
    return rows


# -- 3. per-step cost -------------------------------------------------------------------------


def step_child(model_kind: str, precision: str, steps: int, block: int, threads: int) -> None:
    """Plain loop and accelerate loop on two copies of one model, in alternating blocks of steps."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_kind == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            hidden_dropout_prob=0.0,  # the two copies must see the same maths, not different masks
            attention_probs_dropout_prob=0.0,
        )
        plain_model = BertForSequenceClassification(config)
        batches = [
            {
                "input_ids": torch.randint(5, 1000, (16, 32)),
                "attention_mask": torch.ones(16, 32, dtype=torch.long),
            }
            for _ in range(8)
        ]

        def logits_of(model: Any, batch: dict) -> Any:
            return model(**batch).logits

    else:  # an MLP whose step takes ~0.1 ms: what is left is the loop's own overhead
        plain_model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 2))
        batches = [{"x": torch.randn(16, 32)} for _ in range(8)]

        def logits_of(model: Any, batch: dict) -> Any:
            return model(batch["x"])

    labels = torch.randint(0, 2, (16,))
    acc_model = copy.deepcopy(plain_model)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    acc_opt = torch.optim.AdamW(acc_model.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    acc_model, acc_opt = accelerator.prepare(acc_model, acc_opt)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def plain_step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = logits_of(plain_model, batch)
        loss = F.cross_entropy(logits.float(), labels)  # accelerate hands back fp32 outputs too
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def acc_step(batch: dict) -> None:
        logits = logits_of(acc_model, batch)  # prepare() put autocast and the fp32 cast on forward
        loss = F.cross_entropy(logits, labels)
        accelerator.backward(loss)
        acc_opt.step()
        acc_opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"plain": [], "accelerate": []}
    for step_fn in (plain_step, acc_step):  # warm-up, untimed
        for i in range(10):
            step_fn(batches[i % len(batches)])
    done = 0
    while done < steps:
        for step_fn, name in ((plain_step, "plain"), (acc_step, "accelerate")):
            for i in range(done, done + block):
                start = time.perf_counter()
                step_fn(batches[i % len(batches)])
                times[name].append(time.perf_counter() - start)
        done += block
    diff = max(
        (a.detach().float() - b.detach().float()).abs().max().item()
        for a, b in zip(plain_model.parameters(), accelerator.unwrap_model(acc_model).parameters())
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "plain_ms": [1e3 * t for t in times["plain"]],
                "accelerate_ms": [1e3 * t for t in times["accelerate"]],
                "max_weight_diff": diff,
                "threads_after_accelerator": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def step_costs(repeat: int, steps: int, block: int, threads: int) -> list[dict[str, Any]]:
    combos = [(m, p) for m in ("tiny-bert", "mlp") for p in ("fp32", "bf16")]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in combos}
    for _ in range(repeat):
        for model_kind, precision in combos:
            cmd = [sys.executable, __file__, "--child", model_kind, precision]
            cmd += ["--steps", str(steps), "--block", str(block), "--threads", str(threads)]
            out = subprocess.run(cmd, env=env(), capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not lines:
                raise SystemExit(
                    f"{model_kind} {precision} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
                )
            r = json.loads(lines[-1][len("RESULT ") :])
            plain, acc = statistics.median(r["plain_ms"]), statistics.median(r["accelerate_ms"])
            runs[(model_kind, precision)].append(
                {
                    "plain_ms": plain,
                    "accelerate_ms": acc,
                    "ratio": acc / plain,
                    "max_weight_diff": r["max_weight_diff"],
                    "threads_after_accelerator": r["threads_after_accelerator"],
                    "load": os.getloadavg()[0],
                }
            )
            print(
                f"{model_kind:9s} {precision}: plain {plain:.3f} ms  accelerate {acc:.3f} ms  "
                f"ratio {acc / plain:.3f}  max weight diff {r['max_weight_diff']:.1e}  "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    rows = []
    for (model_kind, precision), rs in runs.items():
        rows.append(
            {
                "model": model_kind,
                "precision": precision,
                "plain_ms": statistics.median(r["plain_ms"] for r in rs),
                "accelerate_ms": statistics.median(r["accelerate_ms"] for r in rs),
                "overhead_us": 1e3 * statistics.median(r["accelerate_ms"] - r["plain_ms"] for r in rs),
                "paired_ratio": statistics.median(r["ratio"] for r in rs),
                "ratios": [round(r["ratio"], 3) for r in rs],
                "max_weight_diff": max(r["max_weight_diff"] for r in rs),
                "threads_after_accelerator": rs[-1]["threads_after_accelerator"],
                "runs": rs,
            }
        )
    return rows


# -- report -----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    h = report["header"]
    lines = [
        "# Build on accelerate? Raw figures",
        "",
        f"- command: `{h['command']}`",
        f"- {h['date']}; {h['machine']}; load average before / after: {h['load_before']} / {h['load_after']}",
        "",
        "## Import time (fresh process per run, statements interleaved)",
        "",
        "| statement | median s | min s | all runs s | heavy modules it loads |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for r in report["imports"]:
        heavy = ", ".join(r["heavy_modules_loaded"]) or "-"
        # The minimum is the run least disturbed by other jobs on a shared machine.
        lines.append(
            f"| `{r['statement']}` | {r['median_s']:.3f} | {min(r['all_s']):.3f} | {r['all_s']} | {heavy} |"
        )
    lines += [
        "",
        "## Install size",
        "",
        "| package | version | files | MB | Python lines |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in report["sizes"]:
        lines.append(
            f"| {r['dist']} | {r['version']} | {r['files']} | {r['mb']:.2f} | {r['python_lines']:,} |"
        )
    lines += [
        "",
        "## Per-step cost: plain torch loop vs Accelerator.prepare + accelerator.backward (CPU)",
        "",
        "| model | precision | plain ms/step | accelerate ms/step | overhead µs/step "
        "| accelerate / plain (paired; each process) | max weight difference |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in report["steps"]:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['plain_ms']:.3f} | {r['accelerate_ms']:.3f} | "
            f"{r['overhead_us']:+.0f} | {r['paired_ratio']:.3f} ({', '.join(map(str, r['ratios']))}) | "
            f"{r['max_weight_diff']:.1e} |"
        )
    lines += [
        "",
        "Step times are medians over the process's timed steps (blocks of steps alternate between the two "
        "loops); each process is one pairing, and the table gives the median over processes.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per loop and process")
    parser.add_argument("--block", type=int, default=25, help="steps in a row before switching loops")
    # One thread: the wrapper's cost is Python time, and on a shared machine two-thread kernels
    # wait on each other and swamp it (MLP steps of 0.6 ms took 100-200 ms at load 6).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="output path stem")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        step_child(*args.child, args.steps, args.block, args.threads)
        return
    if args.quick:
        args.repeat, args.steps = 2, 100
    stem = Path(args.out or ("runs/accelerate-quick" if args.quick else HERE / "results" / "accelerate"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        "unknown CPU",
    )
    header = {
        "command": " ".join(
            ["python", "benchmarks/accelerate_decision.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, accelerate {importlib.metadata.version('accelerate')}",
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    report = {"header": header, "sizes": sizes(), "imports": import_times(args.repeat)}
    for r in report["imports"]:
        print(f"{r['statement']:58s} {r['median_s']:.3f} s  {r['all_s']}", flush=True)
    report["steps"] = step_costs(args.repeat, args.steps, args.block, args.threads)
    header["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
