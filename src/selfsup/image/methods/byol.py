"""BYOL (Grill et al., 2020): an online network (encoder, projector, predictor) predicts the
projection that a slow target network -- an exponential moving average of the online one --
gives of the other view. The target's momentum rises from `--momentum` to 1 on a cosine
schedule over the run; the target is part of the checkpoint, so a resumed run continues it
exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.engine.ema import frozen_copy
from selfsup.image.config import PretrainConfig
from selfsup.image.losses.noncontrastive import negative_cosine
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead


@dataclass
class Options:
    """BYOL's own options (the paper: 256-d projections, 4096 hidden, momentum 0.996)."""

    projection_dim: int = option(256, "output size of the projector and predictor", check=">=1")
    projection_hidden: int = option(1024, "hidden size of the projector and predictor", check=">=1")
    momentum: float = option(
        0.99, "the target's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )


class BYOL(Method):
    Options = Options
    momentum_targets = (("target_encoder", "encoder"), ("target_projection", "projection"))

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        self.projection = ProjectionHead(
            self.encoder.feature_dim, o.projection_hidden, o.projection_dim
        )
        self.predictor = ProjectionHead(o.projection_dim, o.projection_hidden, o.projection_dim)
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projection = frozen_copy(self.projection)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        views = torch.cat([self.views(x, g), self.views(x, g)])
        features = self.encoder(views)
        p1, p2 = self.predictor(self.projection(features)).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projection(self.target_encoder(views)).chunk(2)
        loss = (negative_cosine(p1, t2) + negative_cosine(p2, t1)) / 2
        return loss, features[: len(x)]
