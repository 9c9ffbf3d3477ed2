"""Hyperparameter search on real tweets: `llmtune.search` with `default_space` against the defaults.

all-MiniLM-L6-v2 on 2,000 tweets (negative / neutral / positive), split stratified into
train / validation / test; each trial trains on train and is scored by macro-F1 on
validation (Optuna's TPE sampler and median pruner); the best trial's model and a FineTuner
with every default are then scored on the held-out test split. Run from the repository root:

    python benchmarks/search.py --layers 2   # 16 trials, 2-layer encoder: the recorded run
    python benchmarks/search.py --quick    # 2-layer encoder, 300 tweets, 3 trials

Writes benchmarks/results/search.{md,json} (--quick: runs/search-quick.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "examples"))
sys.path.append(str(HERE))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="encoder directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--size", type=int, default=2000, help="tweets in all (train + validation + test)")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N encoder layers")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output path stem (default benchmarks/results/search)")
    parser.add_argument("--quick", action="store_true", help="2-layer encoder, 300 tweets, 3 trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.trials, args.layers = 300, 3, 2

    import optuna
    import torch
    from sentiment import default_model, load_tweets
    from train_throughput import machine

    from llmtune import ClassifierModel, FineTuner
    from llmtune.search import FeatureCache, default_space, search

    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.model = args.model or default_model()
    data = load_tweets(args.size, args.seed)
    rest, test = data.split(validation=0.2, seed=args.seed)
    train, val = rest.split(validation=0.2, seed=args.seed)
    extra = {} if args.layers is None else {"num_hidden_layers": args.layers}
    max_k = min(3, args.layers or 3)  # TopLayers' k, at most the layers there are

    def new_model() -> ClassifierModel:
        return ClassifierModel.from_pretrained(
            args.model, labels=data.labels, max_length=args.max_length, **extra
        )

    def build(trial: optuna.Trial) -> FineTuner:
        strategies = ("Full", "HeadOnly", "TopLayers", "LoRA")
        settings = default_space(trial, strategies=strategies, epochs=(1, 3), top_layers=(1, max_k))
        return settings.tuner(new_model(), progress=False, seed=args.seed)

    header = {
        "command": shlex.join(["python", "benchmarks/search.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    print(
        f"{len(train)} train / {len(val)} validation / {len(test)} test tweets; {args.trials} trials",
        flush=True,
    )

    start = time.perf_counter()
    defaults = FineTuner(new_model(), progress=False, seed=args.seed)
    defaults.fit(train, val)
    default_seconds = time.perf_counter() - start
    default_val, default_test = defaults.evaluate(val), defaults.evaluate(test)
    print(
        f"defaults: val f1 {default_val['f1']:.4f}, test f1 {default_test['f1']:.4f}",
        f"({default_seconds:.0f} s)",
    )

    cache = FeatureCache()
    sampler = optuna.samplers.TPESampler(seed=args.seed)
    start = time.perf_counter()
    result = search(build, train, val, n_trials=args.trials, sampler=sampler, feature_cache=cache)
    search_seconds = time.perf_counter() - start
    best_test = result.best_tuner.evaluate(test)
    header["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())

    trials = []
    for t in result.study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        epochs = len(t.user_attrs.get("history", []))
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "epochs_run": epochs,
                "seconds": seconds,
            }
        )
    summary = {
        "header": header,
        "split": {"train": len(train), "validation": len(val), "test": len(test)},
        "defaults": {"validation": default_val, "test": default_test, "seconds": default_seconds},
        "best": {"params": result.best_params, "validation_f1": result.best_value, "test": best_test},
        "search_seconds": search_seconds,
        "feature_cache": {"encoded": cache.misses, "looked_up": cache.hits},
        "trials": trials,
    }
    stem = Path(args.out or ("runs/search-quick" if args.quick else HERE / "results" / "search"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    markdown = render(summary, args)
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    return summary


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def render(s: dict[str, Any], args: argparse.Namespace) -> str:
    h, d, b = s["header"], s["defaults"], s["best"]
    encoder = "all-MiniLM-L6-v2" + (f" cut to {args.layers} layers" if args.layers else "")
    pruned = sum(t["state"] == "PRUNED" for t in s["trials"])
    lines = [
        "# Hyperparameter search on tweets: llmtune.search vs the defaults",
        "",
        f"- command: `{h['command']}`",
        f"- date: {h['date']}; machine: {h['machine']}",
        f"- load average before / after: {h['load_before']} / {h['load_after']}",
        f"- {encoder}, max length {args.max_length}; tweets split {s['split']['train']} train / "
        f"{s['split']['validation']} validation / {s['split']['test']} test (stratified, seed {args.seed})",
        f"- {len(s['trials'])} trials of `default_space` (Full, HeadOnly, TopLayers, LoRA; 1-3 epochs), "
        f"TPE sampler (seed {args.seed}), median pruner; {pruned} pruned; "
        f"search took {s['search_seconds']:.0f} s",
        f"- feature cache: {s['feature_cache']['encoded']} texts encoded, {s['feature_cache']['looked_up']} "
        "looked up by head-only trials",
        "",
        "| | settings | validation macro-F1 | test accuracy | test macro-F1 |",
        "| --- | --- | ---: | ---: | ---: |",
        f"| defaults | Full, AdamW lr 5e-5, head lr 1e-3, 3 epochs, batch 32 ({d['seconds']:.0f} s) | "
        f"{d['validation']['f1']:.4f} | {d['test']['accuracy']:.4f} | {d['test']['f1']:.4f} |",
        f"| best trial | {_params(b['params'])} | {b['validation_f1']:.4f} | {b['test']['accuracy']:.4f} | "
        f"{b['test']['f1']:.4f} |",
        "",
        "| trial | state | validation macro-F1 | epochs run | seconds | settings |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for t in s["trials"]:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        seconds = "-" if t["seconds"] is None else f"{t['seconds']:.0f}"
        lines.append(
            f"| {t['number']} | {t['state']} | {value} | {t['epochs_run']} | {seconds} | "
            f"{_params(t['params'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
