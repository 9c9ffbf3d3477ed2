"""`import llmtune` stays light: heavy optional modules load only when a feature needs them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    *("peft", "matplotlib", "pandas", "sklearn"),
    *("optuna", "mlflow", "tensorboard", "onnxruntime", "onnx", "onnxscript"),  # the integrations' extras
)


def test_import_llmtune_loads_no_heavy_optional_module():
    code = f"import llmtune, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"`import llmtune` imported {out.stdout.strip()}"


# torch APIs llmtune calls that are younger than torch 2.0, with the release that brought them.
TORCH_APIS = {
    "torch.nn.utils.get_total_norm": (2, 6),
    "torch.nn.RMSNorm": (2, 4),
    "torch.amp.GradScaler": (2, 3),
}


def test_the_torch_requirement_admits_no_release_without_the_apis_used():
    import re
    from pathlib import Path

    import tomllib
    import torch

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    spec = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split(".")[:2])
    for api, since in TORCH_APIS.items():
        module, _, name = api.rpartition(".")
        assert hasattr(eval(module, {"torch": torch}), name), api  # still where we call it
        assert floor >= since, f"pyproject allows torch {floor}, but {api} arrived in {since}"
