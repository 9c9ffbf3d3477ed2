"""New embedding rows placed by their contexts against rows drawn at random, paired by seed.

The Chinese reviews with all-MiniLM-L6-v2 (max length 128), quality.py's splits, draws and
llmtune runner, with `_vocabulary.CONTEXT_MAX_TEXTS` set so that one arm always places the
rows by context and the other always draws them; TF-IDF on the same draw for scale. The
figures in `llmtune/_vocabulary.py` and docs/quality.md come from here and quality.py:

    python benchmarks/context_rows.py --size 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import quality

from llmtune import _vocabulary

ARMS = {"context": 10**9, "random": -1}  # CONTEXT_MAX_TEXTS for each arm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1000", help='per class ("8", "64") or in all ("300", "1000")')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    pool, val_pool, test = quality.fixed_splits(quality.LOADERS["reviews-zh"]())
    encoder, _ = quality.encoder_choice("minilm")
    extra = {"max_length": 128}
    for seed in args.seeds:
        train, val = quality.draws(pool, val_pool, args.size, seed)
        for arm in [*ARMS, "tfidf"]:
            start = time.perf_counter()
            if arm == "tfidf":
                metrics = quality.run_tfidf(train, val, test, encoder, seed, extra)
            else:
                _vocabulary.CONTEXT_MAX_TEXTS = ARMS[arm]
                metrics = quality.run_llmtune(train, val, test, encoder, seed, extra)
            row = {"size": args.size, "seed": seed, "arm": arm, "seconds": time.perf_counter() - start}
            print(json.dumps({**row, "accuracy": float(metrics["accuracy"])}), flush=True)


if __name__ == "__main__":
    main()
