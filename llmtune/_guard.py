"""The NaN/inf guard: a step's loss and gradient norm must be finite before the weights move."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .errors import TrainingError

if TYPE_CHECKING:
    from .trainer import FineTuner, TrainState

logger = logging.getLogger("llmtune")


def gradients(params: list[torch.Tensor], sparse_rows: torch.Tensor | None) -> list[torch.Tensor]:
    """The gradients to norm and clip: the dense ones, and a sparse one as its rows' values."""
    grads = [p.grad for p in params if p.grad is not None and not p.grad.is_sparse]
    return grads + ([sparse_rows] if sparse_rows is not None else [])


def grad_norm(
    grads: list[torch.Tensor], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> torch.Tensor:
    """The total norm of `grads` (after fp16 unscaling): for clipping and the finite check."""
    scaler.unscale_(optimizer)  # a no-op unless fp16 scaling is on
    # What clip_grad_norm_ computes first; taken apart so a bad gradient is seen before clipping.
    return torch.nn.utils.get_total_norm(grads)


def clip(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale `grads` in place to total norm `max_norm`, as ``clip_grads_with_norm_`` does.

    Takes gradient tensors rather than parameters, so a sparse gradient's rows can be passed.
    """
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


def check_finite(
    tuner: FineTuner,
    state: TrainState,
    losses: list[torch.Tensor],
    norm: torch.Tensor,
    scaler: torch.amp.GradScaler,
    batches: int,
) -> bool:
    """True if the step's loss and gradient norm are finite; else raise, or False to skip.

    The loop's one host sync per optimizer step (the loss is otherwise read only every few
    steps): cheap next to backward, and it keeps NaN out of the weights and checkpoints.
    With fp16 the grad scaler skips inf-gradient steps itself, so only the loss counts.
    Under data parallelism the norm is of the all-reduced gradients, so every rank decides alike.
    """
    finite = torch.isfinite(torch.stack(losses)).all()
    if not scaler.is_enabled():
        finite &= torch.isfinite(norm)
    if finite.item():
        return True
    first, last = state.batches_done - batches, state.batches_done - 1
    bad = [first + i for i, loss in enumerate(losses) if not torch.isfinite(loss)]
    named = tuner.model.named_parameters()
    grads = [n for n, p in named if p.grad is not None and not _stored_values(p.grad).isfinite().all()]
    what = f"loss in batch index {bad[0]}" if bad else f"gradient of {grads[:1]} (norm {norm:g})"
    where = f"batch index {first}" if first == last else f"batch indices {first}-{last}"
    message = (
        f"non-finite {what} at step {state.step + 1} (epoch {state.epoch + 1}, {where} of the epoch's "
        f"{state.batches_per_epoch}); the weights were not updated."
    )
    if tuner.nonfinite == "raise":
        raise TrainingError(
            f"{message} Lower the learning rate, check the data for extreme values, or pass "
            "FineTuner(nonfinite='skip') to skip such steps."
        )
    logger.warning("skipped: %s", message)
    state.epoch_skipped += 1
    state.skipped += 1
    return False


def _stored_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient (the fast paths keep the word embedding's sparse)."""
    return grad.coalesce().values() if grad.is_sparse else grad
