"""SimSiam (Chen & He, 2021): two views, a projector and a predictor; each view's prediction
is pulled towards the other view's projection, through which no gradient flows. No negatives,
no momentum encoder: the stop-gradient alone prevents collapse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.core.config import option
from selfsup.image.config import PretrainConfig
from selfsup.image.losses.noncontrastive import negative_cosine
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead


@dataclass
class Options:
    """SimSiam's own options (the paper's sizes are 2048 and a 512 bottleneck)."""

    projection_dim: int = option(512, "output size of the projector", check=">=1")
    projection_hidden: int = option(512, "hidden size of the projector", check=">=1")
    predictor_hidden: int = option(128, "bottleneck of the predictor", check=">=1")


class SimSiam(Method):
    Options = Options

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        self.projection = nn.Sequential(  # the paper's projector ends in BatchNorm
            ProjectionHead(self.encoder.feature_dim, o.projection_hidden, o.projection_dim, 3),
            nn.BatchNorm1d(o.projection_dim),
        )
        self.predictor = ProjectionHead(o.projection_dim, o.predictor_hidden, o.projection_dim)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        features = self.encoder(torch.cat([self.views(x, g), self.views(x, g)]))
        z1, z2 = self.projection(features).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        return loss, features[: len(x)]
