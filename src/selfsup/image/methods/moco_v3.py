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
from selfsup.image.methods.simclr import both, per_image, view_pairs


@dataclass
class Options(PredictorOptions):
    """MoCo v3's own options (the authors' code: 256-d output, 4096 hidden, T 1.0 for
    ResNets, momentum 0.99)."""

    temperature: float = option(1.0, "InfoNCE temperature", check=">0")
    momentum: float = option(
        0.99, "the key encoder's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )


class MoCoV3(Momentum, Siamese):
    """The other images' keys are negatives: `--accumulate` caches gradients (exact); the keys
    are computed once, micro-batch by micro-batch, without gradient."""

    Options = Options
    grad_cache = True
    projection_layers, predictor_layers = 3, 2
    momentum_targets = (("key_encoder", "encoder"), ("key_projection", "projection"))

    def cache_inputs(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, ...]:
        pairs = view_pairs(self, x, g)
        micro = pairs.tensor_split(self.config.accumulate)
        return pairs, torch.cat([per_image(self.targets(both(p)), len(p)) for p in micro])

    def embed(self, pairs: Tensor, keys: Tensor) -> tuple[Tensor, ...]:
        """(view 1's encoder features, N×2×D predictions, the keys as they came)."""
        features = self.encoder(both(pairs))
        p = self.predictor(self.projection(features))
        return features[: len(pairs)], per_image(p, len(pairs)), keys

    def batch_loss(self, y: Tensor, q: Tensor, k: Tensor) -> Tensor:
        t = self.options.temperature
        return batch_info_nce(q[:, 0], k[:, 1], t) + batch_info_nce(q[:, 1], k[:, 0], t)
