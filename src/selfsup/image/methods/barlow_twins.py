"""Barlow Twins (Zbontar et al., 2021): the cross-correlation matrix of two views' standardised
embeddings is pushed to the identity: equal on the diagonal (invariance), zero elsewhere
(redundancy reduction). No negatives, no stop-gradient, no momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses.noncontrastive import barlow_twins
from selfsup.image.methods.siamese import ProjectorOptions, Siamese


@dataclass
class Options(ProjectorOptions):
    """Barlow Twins' own options (the paper: an 8192-wide projector, lambda 5e-3)."""

    redundancy: float = option(
        5e-3, "weight of the off-diagonal (redundancy) term, the paper's lambda", check=">=0"
    )


class BarlowTwins(Siamese):
    Options = Options
    projection_layers = 3

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        e = self.embed_views(x, g)
        return barlow_twins(*e.z.chunk(2), self.options.redundancy), e.features[: len(x)]
