"""Momentum (EMA) targets, for the methods that bootstrap from a slow copy of themselves (BYOL's
target, MoCo's key encoder, DINO's teacher): a frozen copy, the cosine schedule of its momentum,
and the update."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that the optimiser never touches (only `ema_update` moves it)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_momentum(step: int, total: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: tau = final - (final - base) (cos(pi step / total) + 1) / 2, from `base`
    at step 0 to `final` at the last step."""
    progress = min(max(step / max(1, total), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau target + (1 - tau) online, parameter by parameter; buffers (BatchNorm's
    running statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o.detach(), alpha=1 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)
