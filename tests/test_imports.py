"""`import llmtune` stays light: heavy optional modules load only when a feature needs them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("peft", "matplotlib", "pandas", "sklearn")


def test_import_llmtune_loads_no_heavy_optional_module():
    code = f"import llmtune, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"`import llmtune` imported {out.stdout.strip()}"
