"""README.md's quick-start code block runs as written, on a tiny local model instead of bert-base-uncased."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import sentiment_texts, tiny_encoder

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md has no python block under '## Quick start'"
    return match.group(1)


def test_quick_start_runs(tmp_path, tokenizer, monkeypatch):
    import pandas as pd

    texts, labels = sentiment_texts(120)
    pd.DataFrame({"review": texts, "sentiment": labels}).to_csv(tmp_path / "reviews.csv", index=False)
    encoder_dir = tmp_path / "tiny-bert"
    tiny_encoder(tokenizer).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)

    code = quick_start_code()
    assert '"bert-base-uncased"' in code and '"out/"' in code
    code = code.replace('"bert-base-uncased"', repr(str(encoder_dir))).replace(
        '"out/"', repr(str(tmp_path / "out"))
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)

    assert len(namespace["history"]) == 3  # epochs=3 in the README
    assert (tmp_path / "out" / "llmtune_head.json").is_file()
    assert namespace["model"].labels == ["neg", "pos"]
