"""Run by tests/test_distributed.py under torchrun (gloo): losses that gather across processes.

Every process builds the same float64 batch and takes its own slice of it. The batch tensors are
the leaves, like parameters every process shares, so averaging their gradients over processes is
what DDP does. Each process saves the inputs, its own losses, and the averaged losses and
gradients to OUT/rankR.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from selfsup.engine.distributed import gather_with_grad, rank, world_size
from selfsup.image.losses import chunked
from selfsup.image.losses.clip import clip_loss
from selfsup.image.losses.contrastive import info_nce, nt_xent, supcon_ids

T = 0.3


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    chunked.BLOCK_ELEMENTS = 2 * 12  # blocks of 2 anchor rows: block boundaries under gather too
    r, w = rank(), world_size()
    g = torch.Generator().manual_seed(0)
    n = 6  # samples per process
    inputs = {
        "z1": torch.randn(w * n, 5, generator=g, dtype=torch.float64),
        "z2": torch.randn(w * n, 5, generator=g, dtype=torch.float64),
        "y": torch.tensor([0, 1, -1, 2, 0, -1, 1, -1, 3, 0, 2, -1][: w * n]),
        # anchors with a positive: 4 of rank 0's samples, all 6 of rank 1's
        "z": torch.randn(w * n, 5, generator=g, dtype=torch.float64),
        "ids": torch.tensor([0, 0, 1, 2, 3, 4, 1, 1, 5, 5, 2, 1][: w * n]),
    }
    mine = slice(r * n, (r + 1) * n)

    def simclr(z1, z2, z):
        return nt_xent(z1[mine], z2[mine], T)

    def supcon(z1, z2, z):
        ids = supcon_ids(inputs["y"][mine]).repeat(2)
        return info_nce(torch.cat([z1[mine], z2[mine]]), ids, T)

    def uneven(z1, z2, z):
        return info_nce(z[mine], inputs["ids"][mine], T)

    def no_gather(z1, z2, z):
        return info_nce(z[mine], inputs["ids"][mine], T, gather=False)

    def clip(z1, z2, z):  # z1: images, z2: their captions; logit scale 1/T
        return clip_loss(z1[mine], z2[mine], 1 / T)

    # gather_with_grad alone: rank r holds [r, r]; its uses weigh the gathered rows by (r+1)·k
    t = torch.full((2,), float(r), dtype=torch.float64, requires_grad=True)
    gathered = gather_with_grad(t)
    (gathered * torch.arange(2.0 * w, dtype=torch.float64) * (r + 1)).sum().backward()
    results = {"inputs": inputs, "gathered": gathered.detach(), "gather_grad": t.grad}

    for case in (simclr, supcon, uneven, no_gather, clip):
        leaves = [inputs[k].clone().requires_grad_() for k in ("z1", "z2", "z")]
        loss = case(*leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        averaged = [loss.detach().clone(), *grads]
        for a in averaged:  # what DDP does to gradients (and a synced log does to the loss)
            dist.all_reduce(a)
            a /= w
        results[case.__name__] = {"local_loss": loss.detach(), "loss": averaged[0]}
        results[case.__name__]["grads"] = averaged[1:]
    torch.save(results, out / f"rank{r}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
