"""quality.py's report: the full table, where the defaults stand against the baselines, the plot.

    python benchmarks/quality_report.py      # rewrite benchmarks/results/quality.{md,png} from the JSON

"Where the defaults stand" is computed here, not written by hand: per data set, encoder and
size, llmtune's defaults against each of the issue's baselines on the seeds both ran, and the
hardest of them (the one the defaults lead by least) in the table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The other contenders; ablations and levers (llmtune-noprobe, ...) and the regression
# floor ("mean") are not baselines the defaults must beat.
BASELINES = ("llmtune-head", "tfidf-lr", "hf-trainer", "setfit")


def write_report(rows: list[dict], out: Path, sizes: Sequence[str], contenders: Sequence[str]) -> None:
    """Mean +- std per (data, encoder, size, contender), the standing table and a plot."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["encoder"], r["size"], r["contender"]), []).append(r)
    lines = [
        "| data | encoder | size | contender | n | seeds | accuracy | macro-F1 | MSE | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def order(key: tuple) -> tuple:
        data, encoder, size, contender = key
        return data, encoder, sizes.index(size), contenders.index(contender)

    def stat(rs: list[dict], key: str, scale: float = 100) -> str:
        values = [r[key] * scale for r in rs if key in r]
        return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else ""

    for key in sorted(groups, key=order):
        rs = groups[key]
        seconds = np.mean([r["seconds"] for r in rs])
        lines.append(
            f"| {' | '.join(key)} | {rs[0]['train']} | {len(rs)} | {stat(rs, 'accuracy')} | "
            f"{stat(rs, 'f1')} | {stat(rs, 'mse', 1000)} | {seconds:.0f} |"
        )
    note = "Accuracy and macro-F1 in %, MSE x 1000; mean ± standard deviation over seeds.\n\n"
    out.with_suffix(".md").write_text(
        "# Result quality\n\n"
        + standing(groups, sizes)
        + "\n## Every contender\n\n"
        + note
        + "\n".join(lines)
        + "\n"
    )
    plot(groups, contenders, out.with_suffix(".png"))


def score(row: dict) -> float:
    """Higher is better: accuracy in %, or minus the MSE x 1000."""
    return row["accuracy"] * 100 if "accuracy" in row else -row["mse"] * 1000


def paired(ours: list[dict], theirs: list[dict]) -> dict | None:
    """Our lead over them on the seeds both ran: means, per-seed differences and their SE."""
    mine, other = ({r["seed"]: score(r) for r in rs} for rs in (ours, theirs))
    seeds = sorted(mine.keys() & other.keys())
    if not seeds:
        return None
    d = np.array([mine[s] - other[s] for s in seeds])
    return {
        "seeds": len(seeds),
        "ours": float(np.mean([mine[s] for s in seeds])),
        "theirs": float(np.mean([other[s] for s in seeds])),
        "lead": float(d.mean()),
        "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
        "ahead": int((d > 0).sum()),
    }


def standings(groups: dict[tuple, list[dict]], sizes: Sequence[str]) -> list[dict]:
    """Per (data, encoder, size) with llmtune rows: the defaults against their hardest baseline."""
    out = []
    for (data, encoder, size, contender), ours in groups.items():
        if contender != "llmtune":
            continue
        against = {
            name: p
            for name in BASELINES
            if (theirs := groups.get((data, encoder, size, name))) and (p := paired(ours, theirs))
        }
        if against:
            name = min(against, key=lambda n: against[n]["lead"])
            regression = "accuracy" not in ours[0]
            out.append(
                {"data": data, "encoder": encoder, "size": size, "baseline": name, "regression": regression}
                | against[name]
            )
    return sorted(out, key=lambda s: (s["data"], s["encoder"], sizes.index(s["size"])))


def standing(groups: dict[tuple, list[dict]], sizes: Sequence[str]) -> str:
    """The standing table in markdown: is the defaults' mean at or above the hardest baseline's?"""
    lines = [
        "## Where the defaults stand",
        "",
        "llmtune's defaults against the baseline they lead by least (of "
        + ", ".join(BASELINES)
        + "), on the seeds both ran. Scores are test accuracy in %, or for the regression test "
        "MSE x 1000 (lower is better); the lead is in the same units, positive where llmtune "
        "is better, with the standard error of the per-seed differences. The target (the "
        "issue's): the defaults' mean at or above the baseline's.",
        "",
        "| data | encoder | size | llmtune | hardest baseline | seeds | lead ± SE | seeds ahead | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in standings(groups, sizes):
        sign = -1 if s["regression"] else 1  # scores are minus the MSE; show the MSE itself
        lead = f"{s['lead']:+.2f}" + (f" ± {s['se']:.2f}" if s["seeds"] > 1 else "")
        lines.append(
            f"| {s['data']} | {s['encoder']} | {s['size']} | {sign * s['ours']:.2f} | "
            f"{s['baseline']} {sign * s['theirs']:.2f} | {s['seeds']} | {lead} | "
            f"{s['ahead']} of {s['seeds']} | {'met' if s['lead'] >= 0 else '**missed**'} |"
        )
    return "\n".join(lines) + "\n"


def plot(groups: dict[tuple, list[dict]], contenders: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(d, e) for d, e, _, _ in groups})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (data, encoder) in zip(axes[0], panels):
        for contender in contenders:
            points = [
                (
                    np.mean([r["train"] for r in rs]),
                    np.mean([r.get("accuracy", -r.get("mse", 0)) for r in rs]),
                )
                for (d, e, s, c), rs in groups.items()
                if (d, e, c) == (data, encoder, contender)
            ]
            if points:
                x, y = zip(*sorted(points))
                ax.plot(x, y, marker="o", label=contender)
        floor = [
            r["mse"]
            for (d, e, _, c), rs in groups.items()
            for r in rs
            if (d, e, c) == (data, encoder, "mean")
        ]
        if floor:  # regression: a contender far below the mean predictor would flatten the rest
            ax.set_ylim(bottom=-1.5 * max(floor))
        ax.set_xscale("log")
        ax.set_title(f"{data} ({encoder})")
        ax.set_xlabel("training examples")
        ax.set_ylabel("test accuracy (regression: -MSE)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality

    out = quality.ROOT / "benchmarks/results/quality"
    write_report(json.loads(out.with_suffix(".json").read_text()), out, quality.SIZES, quality.CONTENDERS)
    print(out.with_suffix(".md").read_text().split("## Every contender")[0])
