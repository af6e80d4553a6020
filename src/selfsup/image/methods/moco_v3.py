"""MoCo v3 (Chen, Xie & He, 2021): no queue. A query encoder with projector and predictor, a
momentum (EMA) key encoder with projector; each view's prediction is contrasted with the other
view's keys across the batch (negatives: the other images' keys, from every process).
Symmetric; the key encoder is in the checkpoint, so resume continues it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses.noncontrastive import batch_info_nce
from selfsup.image.methods.siamese import Momentum, PredictorOptions, Siamese


@dataclass
class Options(PredictorOptions):
    """MoCo v3's own options (the authors' code: 256-d output, 4096 hidden, T 1.0 for
    ResNets, momentum 0.99)."""

    temperature: float = option(1.0, "InfoNCE temperature", check=">0")
    momentum: float = option(
        0.99, "the key encoder's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )


class MoCoV3(Momentum, Siamese):
    Options = Options
    projection_layers, predictor_layers = 3, 2
    momentum_targets = (("key_encoder", "encoder"), ("key_projection", "projection"))

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        query = self.embed_views(x, g)
        q1, q2 = query.p.chunk(2)
        k1, k2 = self.targets(query.views).chunk(2)
        t = self.options.temperature
        return batch_info_nce(q1, k2, t) + batch_info_nce(q2, k1, t), query.features[: len(x)]
