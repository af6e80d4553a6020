"""Gradient accumulation: K micro-batches, one optimiser step, in a module's own loop.

`cached_backward` is gradient caching (Gao et al. 2021, GradCache) for losses that couple the
samples of a batch (in-batch negatives): every micro-batch is embedded without a graph, the loss
over all of them gives the gradient of each embedding, then each micro-batch is embedded again,
with its graph, and back-propagated from those cached gradients. K micro-batches of B then give
exactly the gradient of one batch of K·B, holding the activations of one micro-batch at a time.
Normalisation layers see each micro-batch alone (as K processes without SyncBatchNorm would);
their running statistics move once per micro-batch (the graph-free pass leaves them as they
were), and dropout draws the same masks in both passes. Knows neither images nor text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase


@contextmanager
def kept_running_stats(module: nn.Module) -> Iterator[None]:
    """Normalisation layers' running statistics as they were before the block."""
    saved = [
        (m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in module.modules()
        if isinstance(m, _NormBase)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


class RngState:
    """The global random state (CPU, and the CUDA device's), to replay dropout exactly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def cached_backward(
    module: nn.Module,
    embed: Callable[..., Sequence[Tensor]],
    loss_fn: Callable[..., Tensor],
    chunks: Sequence[Sequence[Tensor]],
    backward: Callable[[Tensor], None],
    grad_scale: float = 1.0,
) -> tuple[Tensor, list[Tensor]]:
    """GradCache: (the loss, detached; `embed`'s outputs over all chunks, concatenated).

    `embed(*chunk)` gives row-wise outputs of one micro-batch; `loss_fn(*outputs)` the loss
    over all of them (parameters it uses itself, a learnable temperature, get their gradient
    too). `backward(t)` back-propagates t (the engine's, e.g. Lightning's `manual_backward`);
    `grad_scale`: the factor it multiplies by (a float16 loss scaler's), divided out of the
    cached gradients.
    """
    device = next(module.parameters()).device
    states, parts = [], []
    with torch.no_grad(), kept_running_stats(module):
        for chunk in chunks:
            states.append(RngState(device))
            parts.append(embed(*chunk))
    outputs = [torch.cat(p).detach() for p in zip(*parts, strict=True)]
    for o in outputs:
        o.requires_grad_(o.is_floating_point())
    loss = loss_fn(*outputs)
    backward(loss)
    grads = [None if o.grad is None else o.grad / grad_scale for o in outputs]
    start = 0
    for chunk, state, part in zip(chunks, states, parts, strict=True):
        state.restore()
        rows = len(part[0])
        terms = [
            (o * g[start : start + rows].to(o.dtype)).sum()
            for o, g in zip(embed(*chunk), grads, strict=True)
            if g is not None and o.requires_grad
        ]
        if terms:
            backward(torch.stack(terms).sum())
        start += rows
    return loss.detach(), [o.detach() for o in outputs]


def average_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Gradients averaged over the processes (what DDP does, for backward passes run under
    `no_sync`); nothing in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
