"""Import time: `import llmtune` against `from transformers import Trainer`, by `python -X importtime`.

Each statement runs in a fresh interpreter `--repeat` times (after one warm-up run that fills
the OS file cache); the table gives the median of the cumulative import time that
`-X importtime` reports for the top-level modules, and which heavy optional modules ended up
loaded. Run from the repository root:

    python benchmarks/import_time.py          # 7 runs each, ~30 s

Writes benchmarks/results/import.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATEMENTS = {
    "import llmtune": "import llmtune",
    "import torch": "import torch",
    "import datasets": "import datasets",
    "from transformers import Trainer": "from transformers import Trainer",
}
WATCH = ("torch", "transformers", "datasets", "pandas", "peft", "matplotlib", "sklearn", "pyarrow")


def measure(statement: str) -> tuple[float, list[str]]:
    """Total import seconds (sum of the cumulative times of top-level imports) and the modules loaded."""
    code = f"{statement}; import sys; print(sorted(m for m in {WATCH!r} if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    total = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if name[1:2] != " ":  # a top-level import: nested ones are indented
            total += int(cumulative)
    return total / 1e6, json.loads(proc.stdout.strip().replace("'", '"'))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "results" / "import"))
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = {}
    for label, statement in STATEMENTS.items():
        measure(statement)  # warm the file cache
        runs = [measure(statement) for _ in range(args.repeat)]
        rows[label] = {
            "median_s": statistics.median(t for t, _ in runs),
            "min_s": min(t for t, _ in runs),
            "modules": runs[0][1],
        }
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    base = rows["from transformers import Trainer"]["median_s"]
    lines = [
        "# Import time (`python -X importtime`)",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/import_time.py', *given])}`",
        f"- date: {datetime.date.today().isoformat()}; Python {sys.version.split()[0]}; "
        f"{args.repeat} fresh interpreters per row after a warm-up",
        f"- load average (1, 5, 15 min) before / after: {load_before} / {load_after}",
        "",
        "| statement | median s | min s | vs Trainer | heavy modules loaded |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, r in rows.items():
        lines.append(
            f"| `{label}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['median_s'] / base:.2f}x | "
            f"{', '.join(r['modules']) or '-'} |"
        )
    markdown = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(
        json.dumps({"load": [load_before, load_after], "rows": rows}, indent=2)
    )
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
