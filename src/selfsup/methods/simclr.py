"""SimCLR (Chen et al., 2020): two augmented views, encode, project, InfoNCE over the batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfsup.config import PretrainConfig
from selfsup.losses import nt_xent
from selfsup.methods.base import Method
from selfsup.models import ProjectionHead


class SimCLR(Method):
    def __init__(self, config: PretrainConfig, data_info: dict[str, Any]) -> None:
        super().__init__(config, data_info)
        self.projection = ProjectionHead(
            self.encoder.feature_dim, config.projection_hidden, config.projection_dim
        )

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        views = torch.cat([self.views(x, g), self.views(x, g)])
        features = self.encoder(views)
        z1, z2 = self.projection(features).chunk(2)
        return nt_xent(z1, z2, self.config.temperature), features[: len(x)]
