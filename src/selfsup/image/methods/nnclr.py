"""NNCLR (Dwibedi et al., 2021): SimCLR whose positive for a view is not the other view's
projection but that projection's nearest neighbour in a support set, a FIFO queue of
`--queue-size` L2-normalised projections from earlier batches. Two views through SimSiam's
heads (a 3-layer projector ending in BatchNorm, a 2-layer predictor `--predictor-hidden` wide):
the nearest neighbour (cosine similarity, no gradient) of view 1's projection is contrasted with
view 2's prediction by NT-Xent, and symmetrically. Both lookups read the queue as it was before
this batch (with `--accumulate`, before the optimiser step's); only then are view 1's projections
(all processes' under DDP) written over the oldest entries. The queue starts as random unit
vectors drawn from `--seed`; it and its position are in every checkpoint, so a resumed run keeps
its support set.

The loss is SimCLR's NT-Xent between the neighbours and the predictions, 2B anchors a pair (the
form lightly uses); the paper's pseudocode keeps only the B×B neighbour-to-prediction logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses import nt_xent
from selfsup.image.methods.siamese import MemoryBank, ProjectorOptions
from selfsup.image.methods.simsiam import SimSiam


@dataclass
class Options(ProjectorOptions):
    """NNCLR's own options (the paper: a 98,304-entry support set, T 0.1, a 2048-wide projector
    to 256 and a 4096-wide predictor)."""

    predictor_hidden: int = option(1024, "hidden size of the predictor", check=">=1")
    queue_size: int = option(
        4096, "projections kept as the nearest-neighbour support set", check=">=1"
    )
    temperature: float = option(0.1, "NT-Xent temperature", check=">0")


@torch.no_grad()
def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """For each row of z (B×D), the row of `support` (K×D) of largest cosine similarity,
    L2-normalised, float32 at least; no gradient."""
    z, support = (F.normalize(t.float(), dim=1) for t in (z, support))
    return support[(z @ support.T).argmax(dim=1)]


def nnclr_loss(
    z1: Tensor, z2: Tensor, p1: Tensor, p2: Tensor, support: Tensor, temperature: float = 0.1
) -> Tensor:
    """(NT-Xent(NN(z1), p2) + NT-Xent(NN(z2), p1)) / 2, NN the nearest row of `support`: the
    gradient reaches the predictions only."""
    nn1, nn2 = nearest_neighbours(z1, support), nearest_neighbours(z2, support)
    return (nt_xent(nn1, p2.float(), temperature) + nt_xent(nn2, p1.float(), temperature)) / 2


class NNCLR(MemoryBank, SimSiam):
    """SimSiam's heads (at NNCLR's widths), a support set and NT-Xent."""

    Options = Options

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        e = self.embed_views(x, g)
        (z1, z2), (p1, p2) = e.z.chunk(2), e.p.chunk(2)
        loss = nnclr_loss(z1, z2, p1, p2, self.queue, self.options.temperature)
        if self.training:  # after the lookup: a batch is never its own neighbour
            self.pending.append(z1.detach())
            if self.config.accumulate == 1:
                self.flush_pending()
        return loss, e.features[: len(x)]

    def build_heads(self) -> None:
        super().build_heads()
        # --accumulate: this step's projections, enqueued after the optimiser step (so that its
        # micro-batches look up the support set one batch would)
        self.pending: list[Tensor] = []

    def flush_pending(self) -> None:
        if self.pending:
            self.enqueue(torch.cat(self.pending))  # the whole batch's, in its order
        self.pending.clear()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.flush_pending()
