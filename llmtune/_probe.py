"""Linear probing before fine-tuning: the head starts from a regularised fit on frozen features.

A new head is random, so the first steps of fine-tuning push the encoder's features around
to fit noise. Fitting the head first on the features the pretrained encoder already gives
(a linear probe, then fine-tuning: LP-FT, Kumar et al. 2022) starts training from a head
that already separates the classes. The probe minimises the task's own loss plus an L2
penalty by L-BFGS; the penalty's strength is chosen by k-fold cross-validation on the
training features, so the validation data stay untouched for model selection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

STRENGTHS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def _fit(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    outputs: int,
    strength: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(outputs, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(outputs, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(F.linear(x, weight, bias), y) + 0.5 * strength * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_head(
    head: nn.Linear,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    targets: torch.Tensor,
    strengths: Sequence[float] = STRENGTHS,
    folds: int = 3,
    seed: int = 0,
) -> float:
    """Set `head` to the L2-regularised fit of `loss_fn` on (features, targets); returns the strength.

    The strength is the one with the lowest mean held-out loss over `folds` folds (fewer
    when there are fewer examples); the final fit uses every example.
    """
    x = features.detach().float()
    y = targets.to(x.device)
    n = len(x)
    folds = max(2, min(folds, n // 2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    parts = order.chunk(folds)
    with torch.enable_grad():
        scores = []
        for strength in strengths:
            held_out = 0.0
            for k, part in enumerate(parts):
                rest = torch.cat([p for j, p in enumerate(parts) if j != k])
                weight, bias = _fit(loss_fn, x[rest], y[rest], head.out_features, strength)
                with torch.no_grad():
                    held_out += loss_fn(F.linear(x[part], weight, bias), y[part]).item() * len(part)
            scores.append(held_out / n)
        best = strengths[min(range(len(strengths)), key=scores.__getitem__)]
        weight, bias = _fit(loss_fn, x, y, head.out_features, best)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    return best
