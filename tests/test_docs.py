"""The docs stay true: guide.md's code runs, api.md matches the docstrings, every error is explained."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
from conftest import tiny_encoder

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ERRORS = ("DataError", "ConfigError", "CheckpointError", "TrainingError")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_guide_code_blocks_run(tmp_path, tokenizer, monkeypatch):
    encoder_dir = tmp_path / "tiny-bert"
    tiny_encoder(tokenizer).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    blocks = python_blocks(DOCS / "guide.md")
    assert len(blocks) >= 6
    code = "\n".join(blocks).replace('"bert-base-uncased"', repr(str(encoder_dir)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "guide"}
    exec(compile(code, "docs/guide.md", "exec"), namespace)
    # The subclasses defined on the page really were used end to end.
    assert type(namespace["ft_train"]).__name__ == "FastTextAdapter"
    assert namespace["tuner"].state.step == 1
    assert type(namespace["max_model"]).__name__ == "MaxPoolModel"


def test_index_code_blocks_run(tmp_path, tokenizer, monkeypatch):
    encoder_dir = tmp_path / "tiny-bert"
    tiny_encoder(tokenizer).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    code = "\n".join(python_blocks(DOCS / "index.md"))
    code = code.replace('"bert-base-uncased"', repr(str(encoder_dir))).replace(
        '"out/"', repr(str(tmp_path / "out"))
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/index.md", "exec"), {"__name__": "index"})
    assert (tmp_path / "out" / "llmtune_head.json").is_file()


@pytest.mark.parametrize("page", ["tracking.md", "search.md", "export.md"])
def test_integration_pages_run(page, tmp_path, tokenizer, monkeypatch):
    """The tracking, search and export pages run as written, each as one script, in a fresh directory."""
    needs = {"tracking.md": ("tensorboard", "mlflow"), "search.md": ("optuna",), "export.md": ("onnxscript",)}
    for package in needs[page]:
        pytest.importorskip(package)
    encoder_dir = tmp_path / "tiny-bert"
    tiny_encoder(tokenizer).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    code = "\n".join(python_blocks(DOCS / page)).replace('"bert-base-uncased"', repr(str(encoder_dir)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # llmtune_onnx, as an installed llmtune provides it
    exec(compile(code, f"docs/{page}", "exec"), {"__name__": page})


def load_gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_md_is_up_to_date():
    gen = load_gen_api()
    current = (DOCS / "api.md").read_text(encoding="utf-8")
    assert current == gen.render(), "docs/api.md is stale: run `python docs/gen_api.py`"


def test_api_md_lists_every_public_name():
    import llmtune
    import llmtune.attention
    import llmtune.onnx
    import llmtune.search

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for module in (llmtune, llmtune.attention, llmtune.search, llmtune.onnx):
        for name in module.__all__:
            assert f"### `{name}`" in text, f"{module.__name__}.{name} is missing from docs/api.md"


def test_gen_api_is_generic_over_all(monkeypatch):
    """A name added to __all__ shows up with its signature and docstring line, no code change needed."""
    import llmtune

    def brand_new(x: int, *, y: str = "a") -> bool:
        """Does something new.

        More text that is not part of the summary.
        """
        return True

    monkeypatch.setattr(llmtune, "brand_new", brand_new, raising=False)
    monkeypatch.setattr(llmtune, "__all__", [*llmtune.__all__, "brand_new"])
    text = load_gen_api().render()
    assert "brand_new(x: int, *, y: str = 'a') -> bool" in text
    assert "Does something new." in text and "More text" not in text


def raised_messages() -> list[tuple[str, int, str]]:
    """(file, line, longest literal piece of the message) for each `raise <llmtune error>(...)`."""
    found = []
    for path in sorted((ROOT / "llmtune").glob("**/*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            if not (isinstance(func, ast.Name) and func.id in ERRORS and node.exc.args):
                continue
            message = node.exc.args[0]
            pieces = [
                part.value
                for part in ast.walk(message)
                if isinstance(part, ast.Constant) and isinstance(part.value, str)
            ]
            longest = max(pieces, key=lambda p: len(p.strip()), default="").strip(" .;:,")
            if len(longest) >= 8:
                found.append((str(path.relative_to(ROOT / "llmtune")), node.lineno, longest))
    return found


def test_troubleshooting_explains_every_error():
    doc = " ".join((DOCS / "troubleshooting.md").read_text(encoding="utf-8").split())
    messages = raised_messages()
    assert len(messages) > 30
    missing = [f"{f}:{line}: {text!r}" for f, line, text in messages if " ".join(text.split()) not in doc]
    if missing:
        pytest.fail("docs/troubleshooting.md does not quote these error messages:\n" + "\n".join(missing))
