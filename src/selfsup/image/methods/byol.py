"""BYOL (Grill et al., 2020): an online network (encoder, projector, predictor) predicts the
projection that a slow target network -- an exponential moving average of the online one --
gives of the other view. The target's momentum rises from `--momentum` to 1 on a cosine
schedule over the run; the target is part of the checkpoint, so a resumed run continues it
exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses.noncontrastive import negative_cosine
from selfsup.image.methods.siamese import Momentum, PredictorOptions, Siamese


@dataclass
class Options(PredictorOptions):
    """BYOL's own options (the paper: 256-d projections, 4096 hidden, momentum 0.996)."""

    momentum: float = option(
        0.99, "the target's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )


class BYOL(Momentum, Siamese):
    Options = Options
    predictor_layers = 2
    momentum_targets = (("target_encoder", "encoder"), ("target_projection", "projection"))

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        online = self.embed_views(x, g)
        p1, p2 = online.p.chunk(2)
        t1, t2 = self.targets(online.views).chunk(2)
        loss = (negative_cosine(p1, t2) + negative_cosine(p2, t1)) / 2
        return loss, online.features[: len(x)]
