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
    """Where this process stands: its rank among `world_size`, and how it talks to the others.

    `device` is where the tensors of every collective live and `group` the process group
    they (and DDP) use, None for the default one. The two always agree: an NCCL group
    serves only CUDA tensors, so a count built on the CPU would fail there.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Any = None

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
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=self.group)

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
        """Sum of a tensor over all ranks, on the tensor's own device (itself in one process)."""
        if not self.enabled:
            return value
        total = value.to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.to(value.device)

    def all_true(self, flag: torch.Tensor) -> bool:
        """True when `flag` (a bool tensor) is true on every rank: one decision for all of them."""
        return bool(self.sum((~flag).to(torch.int32)).item() == 0) if self.enabled else bool(flag)

    def gather_rows(self, rows: np.ndarray, indices: np.ndarray, total: int) -> np.ndarray:
        """Put every rank's output rows (for its `indices`) together into one (total, ...) array."""
        if not self.enabled:
            return rows
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, (indices, rows), group=self.group)
        out = np.empty((total, *rows.shape[1:]), dtype=rows.dtype)
        for idx, part in parts:
            out[idx] = part
        return out

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (`[obj]` in one process)."""
        if not self.enabled:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj, group=self.group)
        return parts

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _serves(group: Any, device: torch.device) -> bool:
    """Whether a process group has a backend for tensors on `device` ("nccl": CUDA only)."""
    types = getattr(group, "_device_types", None)  # torch >= 2.2; older groups: assume yes
    return types is None or device.type in {t.type for t in types}


def setup(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. A group we start serves both devices
    ("cpu:gloo,cuda:nccl" on GPUs, gloo on CPUs); a group the caller started is used as it
    is, plus a gloo side group for our collectives when it cannot serve the training
    device (an NCCL group with a CPU model). Returns the context and the device this rank
    trains on (cuda:LOCAL_RANK on GPUs).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        # We opened the group, so we close it: gloo aborts the process at exit otherwise.
        atexit.register(_shutdown)
    group = None
    if not _serves(dist.group.WORLD, device):
        group = dist.new_group(backend="gloo")  # collective: every rank builds it here
    return DistributedContext(rank, world_size, local_rank, device, group), device
