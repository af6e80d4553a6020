"""Optimizers and the warm-up + cosine schedule used by every method."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from selfsup.core.errors import SelfsupError

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as in SimCLR.

    torch ships no LARS; this is the short standard form. Parameter groups with
    `lars_exclude=True` (biases, norm layers) take plain SGD steps without weight decay.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    grad = grad.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on weights of conv/linear layers only; biases and norm layers are exempt.
    A parameter reached through two modules (MAE's ViT is also its encoder's backbone) is listed
    once: twice in a group, the optimiser would step it twice."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(_without_lars_keys(groups), lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(_without_lars_keys(groups), lr=lr)
    if name == "lars":
        return LARS(groups, lr=lr)
    raise SelfsupError(f"--optimizer {name!r} is unknown; expected one of {', '.join(OPTIMIZERS)}")


def _without_lars_keys(groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float = 0.0):
    """LambdaLR factor: linear warm-up to 1, then cosine decay to `final_fraction`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return final_fraction + (1 - final_fraction) * cosine

    return factor
