"""Helpers for losses and loops that see the samples of all processes (DDP): rank, world size,
shares of a batch, gathering and averaging."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from selfsup.core.errors import SelfsupError


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_devices(accelerator: str, devices: str) -> None:
    """A one-line error for `--devices` this machine cannot run, before Lightning starts that
    many processes (and waits for them): more CUDA GPUs than it has, or on a CPU more processes
    than cores (legal for Lightning, but every process then waits for a core, and the start
    takes minutes before a step is slower than one process's)."""
    spec = str(devices).strip().replace(" ", "")
    if spec == "auto":
        return
    name = accelerator.lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    flags = f"--devices {devices} --accelerator {accelerator}"
    if name == "cpu":
        cores = cpu_cores()
        if not spec.isdigit() or not 1 <= int(spec) <= cores:
            raise SelfsupError(
                f"{flags}: this machine has {cores} CPU core(s); a CPU run takes --devices 1 to "
                f"{cores} (one process each) or auto"
            )
    elif name in ("gpu", "cuda"):
        count = torch.cuda.device_count()
        if not re.fullmatch(r"-1|\d+(,\d+)*,?", spec) or spec == "0":
            raise SelfsupError(
                f"{flags}: expected a number of GPUs, -1 (all), a comma list of GPU indices or auto"
            )
        wanted = [int(i) for i in spec.split(",") if i] if "," in spec else None
        if (max(wanted) >= count) if wanted else int(spec) > count:
            raise SelfsupError(
                f"{flags}: this machine has {count} CUDA GPU(s) (indices 0 to {count - 1})"
            )
    elif name == "mps" and spec not in ("1", "-1"):
        raise SelfsupError(f"{flags}: Apple's MPS is one device; use 1 or auto")


def is_distributed() -> bool:
    """True inside an initialised default process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def share(n: int, rank: int, world: int) -> slice:
    """Process `rank`'s contiguous rows of n split over `world` processes (sizes differ by at
    most one; the first processes take the larger shares)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order; [obj] without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_processes(stats: dict[str, float], device: torch.device | str = "cpu") -> dict:
    """Each statistic averaged over the processes (every process passes the same keys); `stats`
    itself without a process group."""
    if not is_distributed():
        return stats
    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(stats, (values / world_size()).tolist(), strict=True))


def sum_over_processes(t: Tensor) -> Tensor:
    """`t` summed over the processes (every process passes the same shape), without autograd;
    `t` itself (detached) without a process group."""
    t = t.detach()
    if not is_distributed():
        return t
    t = t.clone(memory_format=torch.contiguous_format)  # all_reduce is in place
    dist.all_reduce(t)
    return t


def mean_over_rows(x: Tensor) -> Tensor:
    """The mean of `x`'s entries over every process's (an all-reduced sum and count; a process
    may hold none), differentiable in this process's entries; `x.mean()` without a group."""
    if not is_distributed():
        return x.mean()
    total = sum_over_processes(torch.stack([x.sum(), x.new_tensor(x.numel())]))
    return (x.sum() + (total[0] - x.sum().detach())) / total[1]


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
