"""Device, precision and seeding: the few places where the loop meets the hardware."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" picks cuda, then mps, then cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX-512 BF16 or AMX), ~4x fp32 speed."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_bf16(device: torch.device) -> bool:
    """True where the GPU computes bf16 natively: compute capability 8.0 (Ampere) or newer.

    Not `torch.cuda.is_bf16_supported()`: since torch 2.3 it also says yes to bf16 emulated
    without tensor cores (T4, V100), several times slower than their native fp16.
    """
    if torch.version.hip:  # ROCm: every GPU it supports that torch reports runs bf16
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    "auto": bf16 on GPUs that compute it natively (compute capability >= 8), else fp16
    (with a grad scaler); bf16 on CPUs with native bf16 matmuls, fp32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def inference_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """`resolve_precision` for predicting: "auto" never picks fp16. Training's fp16 comes with
    a grad scaler; a prediction has no such guard, and a decoder's activations can pass fp16's
    65,504 and come out NaN. So GPUs without native bf16 (T4, V100) predict in fp32."""
    dtype = resolve_precision(precision, device)
    return None if precision == "auto" and dtype == torch.float16 else dtype


def refuse_fp16_weights(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Refuse fp16 autocast on fp16 weights that train: the grad scaler unscales only fp32
    gradients (torch raised "Attempting to unscale FP16 gradients" at the first step)."""
    if dtype != torch.float16:
        return
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        raise ConfigError(
            f"precision fp16 trains with a grad scaler, which needs fp32 trainable weights; "
            f"{len(half)} are float16 (e.g. {half[0]}). Load the model without dtype=torch.float16, "
            "train LoRA adapters (peft keeps them fp32), or pass precision='fp32'."
        )


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def pad_multiple(device: torch.device) -> int:
    """Batch widths are rounded up to this. On CUDA, 8: scaled_dot_product_attention's cuDNN
    backend builds a plan for each new shape, so a first epoch over up to 128 distinct widths
    ran at a fifth of the speed of the next (H200, MiniLM bf16: 388 samples/s cold, 1,306
    with multiples of 8; warm 1,952 against 2,533). On the CPU padding is pure cost: 1."""
    return 8 if device.type == "cuda" else 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # Plain blocking copies: a batch of token ids is a few kB (32 x 128 int64 = 32 kB, ~10 us
    # over PCIe), so pinning it first would cost more than the overlap could save, and a
    # non_blocking copy from unpinned memory is synchronous anyway.
    return {k: v.to(device) for k, v in batch.items()}
