"""MoCo v3 (Chen, Xie & He, 2021): no queue. A query encoder with projector and predictor, a
momentum (EMA) key encoder with projector; each view's prediction is contrasted with the other
view's keys across the batch (negatives: the other images' keys, from every process).
Symmetric; the key encoder is in the checkpoint, so resume continues it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.engine.ema import frozen_copy
from selfsup.image.config import PretrainConfig
from selfsup.image.losses.noncontrastive import batch_info_nce
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead


@dataclass
class Options:
    """MoCo v3's own options (the authors' code: 256-d output, 4096 hidden, T 1.0 for
    ResNets, momentum 0.99)."""

    projection_dim: int = option(256, "output size of the projector and predictor", check=">=1")
    projection_hidden: int = option(1024, "hidden size of the projector and predictor", check=">=1")
    temperature: float = option(1.0, "InfoNCE temperature", check=">0")
    momentum: float = option(
        0.99, "the key encoder's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )


class MoCoV3(Method):
    Options = Options
    momentum_targets = (("key_encoder", "encoder"), ("key_projection", "projection"))

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        self.projection = ProjectionHead(
            self.encoder.feature_dim, o.projection_hidden, o.projection_dim, 3
        )
        self.predictor = ProjectionHead(o.projection_dim, o.projection_hidden, o.projection_dim)
        self.key_encoder = frozen_copy(self.encoder)
        self.key_projection = frozen_copy(self.projection)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        views = torch.cat([self.views(x, g), self.views(x, g)])
        features = self.encoder(views)
        q1, q2 = self.predictor(self.projection(features)).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_projection(self.key_encoder(views)).chunk(2)
        t = self.options.temperature
        return batch_info_nce(q1, k2, t) + batch_info_nce(q2, k1, t), features[: len(x)]
