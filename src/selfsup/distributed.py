"""Helpers for losses that see the samples of all processes (DDP): rank, world size, gathering."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised default process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def unique_ids(n: int, device: torch.device | str | None = None) -> Tensor:
    """Ids 0..n-1 shifted by rank·n: distinct across processes that each hold n samples."""
    return torch.arange(n, device=device) + rank() * n


def gather_no_grad(t: Tensor) -> Tensor:
    """All processes' `t` concatenated along dim 0 (rank order), without autograd."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_with_grad(t: Tensor) -> Tensor:
    """All processes' `t` (equal shapes) concatenated along dim 0 in rank order, differentiable.

    Backward sums over processes the gradient every process computed for the gathered tensor
    and returns this process's slice, so `t` receives d(sum of all processes' losses)/dt.
    Identity without a process group or with one process.
    """
    return _GatherWithGrad.apply(t) if is_distributed() else t


class _GatherWithGrad(torch.autograd.Function):
    # Not torch.distributed.nn.functional.all_gather: it is deprecated in torch 2.x (a warning on
    # every call), returns a tuple, and its backward on gloo emulates reduce-scatter with one
    # scatter per rank. An all_reduce of the gradient works on every backend in one collective.
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows = t.shape[0]
        return gather_no_grad(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]
