"""The NaN/inf guard: a step's loss and gradient norm must be finite before the weights move.

It gives a verdict and explains it; what happens then (raise or skip) is the loop's policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .trainer import TrainState


class Gradients:
    """The loop's plug point between backward and the optimizer step, for plain gradients.

    `tensors` are what the norm, the finite check and clipping see; `before_step` readies
    them for the optimizer. The CPU fast paths plug in a sparse word-embedding gradient here.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def tensors(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def before_step(self) -> None:
        pass


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


def finite(losses: list[torch.Tensor], norm: torch.Tensor, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Whether a step's losses and gradient norm are finite, as a bool tensor (no host sync).

    With fp16 the grad scaler skips inf-gradient steps itself (a small scale fixes them),
    so only the losses count then.
    """
    ok = torch.isfinite(torch.stack(losses)).all()
    return ok if scaler.is_enabled() else ok & torch.isfinite(norm)


def describe(model: nn.Module, losses: list[torch.Tensor], norm: torch.Tensor, state: TrainState) -> str:
    """What was not finite in the step that just ended, and where in the epoch it was.

    Under data parallelism every rank skips or raises together; a rank whose own numbers
    are finite says that another rank's were not.
    """
    first, last = state.batches_done - len(losses), state.batches_done - 1
    bad = [first + i for i, loss in enumerate(losses) if not torch.isfinite(loss)]
    named = model.named_parameters()
    grads = [n for n, p in named if p.grad is not None and not _stored_values(p.grad).isfinite().all()]
    if bad:
        what = f"loss in batch index {bad[0]}"
    elif grads or not torch.isfinite(norm):
        what = f"gradient of {grads[:1]} (norm {float(norm):g})"
    else:
        what = "loss or gradient on another data-parallel rank"
    where = f"batch index {first}" if first == last else f"batch indices {first}-{last}"
    return (
        f"non-finite {what} at step {state.step + 1} (epoch {state.epoch + 1}, {where} of the epoch's "
        f"{state.batches_per_epoch}); the weights were not updated."
    )


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of the model's floating-point tensors that hold NaN or inf (one host sync if none)."""
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    if not tensors or torch.stack([torch.isfinite(v).all() for v in tensors.values()]).all():
        return []
    return [k for k, v in tensors.items() if not torch.isfinite(v).all()]


def _stored_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient (the fast paths keep the word embedding's sparse)."""
    return grad.coalesce().values() if grad.is_sparse else grad
