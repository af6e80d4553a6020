"""MoCo v2 (He et al., 2020; Chen et al., 2020): a query encoder and a momentum (EMA) key
encoder, each with a projection MLP; every query's positive is the key of its other view, its
negatives a queue of `--queue-size` keys from earlier batches (from every process under DDP).
The queue and its position are buffers of the model, so they are in every checkpoint and a
resumed run continues with the same negatives. Symmetrised: each view serves as query once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.core.config import option
from selfsup.engine.distributed import gather_no_grad
from selfsup.engine.ema import frozen_copy
from selfsup.image.config import PretrainConfig
from selfsup.image.losses.noncontrastive import queue_info_nce
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead


@dataclass
class Options:
    """MoCo v2's own options (the paper: a 65,536-key queue, T 0.2, momentum 0.999)."""

    projection_dim: int = option(128, "output size of the projection head", check=">=1")
    projection_hidden: int = option(512, "hidden size of the projection head", check=">=1")
    queue_size: int = option(4096, "negatives kept from earlier batches", check=">=1")
    temperature: float = option(0.2, "InfoNCE temperature", check=">0")
    momentum: float = option(
        0.99, "the key encoder's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )


class MoCo(Method):
    Options = Options
    momentum_targets = (("key_encoder", "encoder"), ("key_projection", "projection"))

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        self.projection = ProjectionHead(
            self.encoder.feature_dim, o.projection_hidden, o.projection_dim
        )
        self.key_encoder = frozen_copy(self.encoder)
        self.key_projection = frozen_copy(self.projection)
        start = torch.randn(
            o.queue_size, o.projection_dim, generator=torch.Generator().manual_seed(config.seed)
        )
        self.register_buffer("queue", F.normalize(start, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        views = torch.cat([self.views(x, g), self.views(x, g)])
        features = self.encoder(views)
        q1, q2 = self.projection(features).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_projection(self.key_encoder(views)).chunk(2)
        t = self.options.temperature
        loss = (queue_info_nce(q1, k2, self.queue, t) + queue_info_nce(q2, k1, self.queue, t)) / 2
        if self.training:
            self.enqueue(torch.cat([k1, k2]))
        return loss, features[: len(x)]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the (all processes') keys over the oldest ones, wrapping around the queue."""
        keys = F.normalize(gather_no_grad(keys.float()), dim=1)[: len(self.queue)]
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))
