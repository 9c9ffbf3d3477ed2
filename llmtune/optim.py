"""OptimizerFactory: optimizer (SGD, Adam, AdamW) with parameter groups, plus the LR schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._layers import layer_depths, layers_of
from ._vocabulary import new_rows
from .errors import ConfigError

__all__ = ["OptimizerFactory"]

SCHEDULES = ("constant", "linear", "cosine")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm)


@dataclass(frozen=True)
class OptimizerFactory:
    """Builds the optimizer and LR schedule for a model once the number of steps is known.

    Parameter groups: no weight decay on biases and normalisation weights; the freshly
    initialised head (`model.head`) gets `head_lr`; with `layer_decay=d` the encoder layer
    at depth i of L gets `lr * d ** (L - i)` (embeddings are depth 0; the depths come from
    the model's layers, `ClassifierModel.encoder_layers`). The word embedding of a model
    whose vocabulary `ClassifierModel.extend_vocabulary` grew gets `head_lr` and no decay: its
    new rows train as new weights, its pretrained rows stay fixed. Only parameters with
    `requires_grad` are handed to the optimizer.

    Args:
        name: "sgd", "adam" or "adamw".
        lr: learning rate of the encoder.
        weight_decay: decoupled (AdamW) or L2 (SGD, Adam) weight decay.
        head_lr: learning rate of the head; "auto" = max(lr, 1e-3), which lets a new head
            learn on small data within a few epochs; None = lr.
        layer_decay: layer-wise LR decay factor in (0, 1], or None for none.
        schedule: "constant", "linear" (decay to 0) or "cosine", each after warmup.
        warmup: warmup steps (int) or fraction of all steps (float < 1).
        options: extra optimizer keyword arguments (betas, eps, momentum, fused...).

    Example:
        >>> factory = OptimizerFactory.adamw(lr=2e-5, warmup=0.1)
        >>> optimizer, scheduler = factory.build(model, total_steps=1000)  # doctest: +SKIP
    """

    name: str = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.01
    head_lr: float | str | None = "auto"
    layer_decay: float | None = None
    schedule: str = "linear"
    warmup: float | int = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.head_lr not in ("auto", None) and not (
            isinstance(self.head_lr, float | int) and self.head_lr > 0
        ):
            raise ConfigError(f"head_lr must be 'auto', None or > 0, got {self.head_lr!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.warmup < 0 or (isinstance(self.warmup, float) and self.warmup >= 1):
            raise ConfigError(f"warmup is steps (int >= 0) or a fraction in [0, 1), got {self.warmup!r}")

    @classmethod
    def sgd(
        cls, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0, **kwargs: Any
    ) -> OptimizerFactory:
        """SGD with momentum."""
        options = {"momentum": momentum, **kwargs.pop("options", {})}
        return cls("sgd", lr, weight_decay, options=options, **kwargs)

    @classmethod
    def adam(cls, lr: float = 5e-5, weight_decay: float = 0.0, **kwargs: Any) -> OptimizerFactory:
        """Adam (weight decay as L2 in the gradient)."""
        return cls("adam", lr, weight_decay, **kwargs)

    @classmethod
    def adamw(cls, lr: float = 5e-5, weight_decay: float = 0.01, **kwargs: Any) -> OptimizerFactory:
        """AdamW (decoupled weight decay), the usual choice for fine-tuning."""
        return cls("adamw", lr, weight_decay, **kwargs)

    # -- parameter groups ---------------------------------------------------------------

    @property
    def resolved_head_lr(self) -> float:
        if self.head_lr == "auto":
            return max(self.lr, 1e-3)
        return self.lr if self.head_lr is None else float(self.head_lr)

    @staticmethod
    def no_decay_names(model: nn.Module) -> set[str]:
        """Names of parameters exempt from weight decay: biases and normalisation weights."""
        names = set()
        for module_name, module in model.named_modules():
            is_norm = isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()
            for param_name, _ in module.named_parameters(recurse=False):
                if is_norm or param_name == "bias":
                    names.add(f"{module_name}.{param_name}" if module_name else param_name)
        return names

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Trainable parameters grouped by (learning rate, weight decay), with their names."""
        no_decay = self.no_decay_names(model)
        head = getattr(model, "head", None)
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        # Encoder parameters by depth (see `_layers`), prefixed as in model.named_parameters().
        depths: dict[str, int] = {}
        num_layers = 0
        if self.layer_decay is not None:
            prefix = "encoder." if isinstance(getattr(model, "encoder", None), nn.Module) else ""
            depths = {prefix + name: d for name, d in layer_depths(model).items()}
            num_layers = len(layers_of(model))
        # extend_vocabulary's embedding: its new rows are new weights (head LR); no decay, as
        # AdamW's decay would move the pretrained rows that the gradient mask holds still.
        grown = new_rows(model)
        groups: dict[tuple[float, float], list[torch.Tensor]] = {}
        names: dict[tuple[float, float], list[str]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in head_ids or param is grown:
                lr = self.resolved_head_lr
            elif name in depths:
                depth = min(depths[name], num_layers)  # above the layers counts as the top one
                lr = self.lr * self.layer_decay ** (num_layers - depth)
            else:
                lr = self.lr
            decay = 0.0 if name in no_decay or param is grown else self.weight_decay
            groups.setdefault((lr, decay), []).append(param)
            names.setdefault((lr, decay), []).append(name)
        if not groups:
            raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
        # The names go into the optimizer's state_dict: a resume matches state to parameters by name.
        return [
            {"params": ps, "param_names": names[key], "lr": key[0], "weight_decay": key[1]}
            for key, ps in groups.items()
        ]

    # -- build --------------------------------------------------------------------------

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup) if isinstance(self.warmup, int) else round(self.warmup * total_steps)

    def fused_default(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """`fused=True` for Adam/AdamW on CPU or CUDA floating-point parameters, unless `options` choose.

        One kernel updates every tensor: on a 2-core CPU an AdamW step over MiniLM's 22.7M
        parameters takes 10 ms instead of 66 ms (for-loop) or 56 ms (foreach): +13% samples/s
        when fine-tuning on tweets. Same update rule and state; results differ in rounding.
        """
        if self.name == "sgd" or {"fused", "foreach", "differentiable", "capturable"} & set(self.options):
            return {}
        params = [p for group in groups for p in group["params"]]
        if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
            return {"fused": True}
        return {}

    def build(
        self, model: nn.Module, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer over `model`'s trainable parameters and its per-step LR schedule."""
        from transformers import get_scheduler

        groups = self.param_groups(model)
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.name]
        optimizer = cls(groups, lr=self.lr, **{**self.fused_default(groups), **self.options})
        name = {"constant": "constant_with_warmup"}.get(self.schedule, self.schedule)
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=self.warmup_steps(total_steps), num_training_steps=total_steps
        )
        return optimizer, scheduler
