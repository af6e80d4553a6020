"""SimSiam (Chen & He, 2021): two views, a projector and a predictor; each view's prediction
is pulled towards the other view's projection, through which no gradient flows. No negatives,
no momentum encoder: the stop-gradient alone prevents collapse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses.noncontrastive import negative_cosine
from selfsup.image.methods.siamese import ProjectorOptions, Siamese


@dataclass
class Options(ProjectorOptions):
    """SimSiam's own options (the paper's sizes are 2048 and a 512 bottleneck)."""

    predictor_hidden: int = option(128, "bottleneck of the predictor", check=">=1")


class SimSiam(Siamese):
    Options = Options
    projection_layers, predictor_layers = 3, 2  # the predictor's hidden: --predictor-hidden
    projection_batch_norm = True  # the paper's projector ends in BatchNorm

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        e = self.embed_views(x, g)
        (z1, z2), (p1, p2) = e.z.chunk(2), e.p.chunk(2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        return loss, e.features[: len(x)]
