"""Data-parallel training on torch.distributed: detect torchrun, join the group, reduce results.

Everything here is a no-op in a single process, so the loop calls it unconditionally.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "setup"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among `world_size` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints progress and writes history and checkpoints."""
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` in DistributedDataParallel when there are several processes, else itself.

        DDP all-reduces only parameters with requires_grad, so LoRA or head-only runs
        exchange just the trainable weights' gradients.
        """
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce on micro-batches before the last one of a step."""
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def total(self, count: int) -> int:
        """Sum of an integer over all ranks (one small all-reduce; free in one process)."""
        if not self.enabled:
            return count
        return int(self.sum(torch.tensor(count)).item())

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over all ranks (the tensor itself in one process)."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather_rows(self, rows: np.ndarray, indices: np.ndarray, total: int) -> np.ndarray:
        """Put every rank's output rows (for its `indices`) together into one (total, ...) array."""
        if not self.enabled:
            return rows
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, (indices, rows))
        out = np.empty((total, *rows.shape[1:]), dtype=rows.dtype)
        for idx, part in parts:
            out[idx] = part
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the backend is NCCL on CUDA, gloo on CPU.
    Returns the context and the device this rank trains on (cuda:LOCAL_RANK on GPUs).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # We opened the group, so we close it: gloo aborts the process at exit otherwise.
        atexit.register(_shutdown)
    return DistributedContext(rank, world_size, local_rank), device
