"""Barlow Twins (Zbontar et al., 2021): the cross-correlation matrix of two views' standardised
embeddings is pushed to the identity: equal on the diagonal (invariance), zero elsewhere
(redundancy reduction). No negatives, no stop-gradient, no momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.config import PretrainConfig
from selfsup.image.losses.noncontrastive import barlow_twins
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead


@dataclass
class Options:
    """Barlow Twins' own options (the paper: an 8192-wide projector, lambda 5e-3)."""

    projection_dim: int = option(512, "output size of the projector", check=">=1")
    projection_hidden: int = option(512, "hidden size of the projector", check=">=1")
    redundancy: float = option(
        5e-3, "weight of the off-diagonal (redundancy) term, the paper's lambda", check=">=0"
    )


class BarlowTwins(Method):
    Options = Options

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        self.projection = ProjectionHead(
            self.encoder.feature_dim, o.projection_hidden, o.projection_dim, 3
        )

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        features = self.encoder(torch.cat([self.views(x, g), self.views(x, g)]))
        z1, z2 = self.projection(features).chunk(2)
        return barlow_twins(z1, z2, self.options.redundancy), features[: len(x)]
