"""The pieces the two-view (Siamese) methods share, each once.

- `Siamese`: two views of every image through the one encoder and a projector (SimCLR, SupCon,
  SimSiam, Barlow Twins, VICReg, BYOL, MoCo v2/v3), with a predictor on top where
  `predictor_layers` is set (SimSiam, BYOL, MoCo v3, NNCLR). Its Options name the sizes:
  `projection_dim`, `projection_hidden`, and `predictor_hidden` where the predictor's differs;
  methods of the same sizes derive their Options from `ProjectorOptions` (SimSiam, Barlow Twins,
  NNCLR) or `PredictorOptions` (BYOL, MoCo v3).
- `Momentum`: frozen EMA copies of online modules (BYOL's target, MoCo's key encoder, DINO's
  teacher), moved after every optimiser step on BYOL's cosine schedule.
- `MemoryBank`: a FIFO queue of normalised embeddings from earlier batches (MoCo's negatives,
  NNCLR's support set).

A method mixes them in, the momentum first: `class BYOL(Momentum, Siamese)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.engine.distributed import gather_no_grad
from selfsup.engine.ema import cosine_momentum, ema_update, frozen_copy
from selfsup.image.config import PretrainConfig
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead
from selfsup.image.models.vit import VIT_SIZES


@dataclass
class ProjectorOptions:
    """A projector's sizes (SimSiam, Barlow Twins, NNCLR: a predictor's hidden size is its own)."""

    projection_dim: int = option(512, "output size of the projector", check=">=1")
    projection_hidden: int = option(512, "hidden size of the projector", check=">=1")


@dataclass
class PredictorOptions:
    """The sizes of a projector and a predictor of the same widths (BYOL, MoCo v3)."""

    projection_dim: int = option(256, "output size of the projector and predictor", check=">=1")
    projection_hidden: int = option(1024, "hidden size of the projector and predictor", check=">=1")


class Embedded(NamedTuple):
    """Both views of a batch of B images, view 1 of every image first (2B rows each)."""

    views: Tensor  # the augmented images
    features: Tensor  # the encoder's output
    z: Tensor  # the projector's
    p: Tensor | None  # the predictor's (None without one)


class Siamese(Method):
    """Two views, one encoder, a projector of `projection_layers` layers (then BatchNorm where
    `projection_batch_norm`) and, where `predictor_layers` > 0, a predictor from the projection
    back to its own size."""

    projection_layers: ClassVar[int] = 2
    projection_batch_norm: ClassVar[bool] = False
    predictor_layers: ClassVar[int] = 0

    def build_heads(self) -> None:
        o = self.options
        head = ProjectionHead(
            self.encoder.feature_dim, o.projection_hidden, o.projection_dim, self.projection_layers
        )
        self.projection = (
            nn.Sequential(head, nn.BatchNorm1d(o.projection_dim))
            if self.projection_batch_norm
            else head
        )
        if self.predictor_layers:
            hidden = getattr(o, "predictor_hidden", o.projection_hidden)
            self.predictor = ProjectionHead(
                o.projection_dim, hidden, o.projection_dim, self.predictor_layers
            )

    def embed_views(self, x: Tensor, g: torch.Generator) -> Embedded:
        """Two views of each image of x, drawn from g, through encoder, projector, predictor."""
        views, features = self.two_views(x, g)
        z = self.projection(features)
        return Embedded(views, features, z, self.predictor(z) if self.predictor_layers else None)


class Momentum(Method):
    """Momentum (EMA) copies, `momentum_targets` as (target, online) attribute names, copied
    from the online modules once they are built and never touched by the optimiser: after every
    optimiser step target <- tau target + (1 - tau) online, tau rising from `options.momentum`
    to 1 on a cosine schedule (BYOL's). The targets are modules, so they are in every checkpoint
    and a resumed run continues them."""

    momentum_targets: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Any = None
    ) -> None:
        super().__init__(config, data_info, options)
        for target, online in self.momentum_targets:
            setattr(self, target, frozen_copy(getattr(self, online)))

    @torch.no_grad()
    def targets(self, views: Tensor) -> Tensor:
        """The target modules in turn (encoder, then head) on `views`, without gradient."""
        for target, _ in self.momentum_targets:
            views = getattr(self, target)(views)
        return views

    def update_targets(self, tau: float) -> None:
        """target <- tau target + (1 - tau) online, for every pair."""
        for target, online in self.momentum_targets:
            ema_update(getattr(self, target), getattr(self, online), tau)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = int(self.trainer.estimated_stepping_batches)
        tau = cosine_momentum(self.global_step, total, self.options.momentum)
        self.update_targets(tau)
        self.log("train/momentum", tau)


class MemoryBank(Method):
    """A FIFO queue of `options.queue_size` L2-normalised embeddings of `options.projection_dim`
    from earlier batches (every process's under DDP), starting as random unit vectors drawn from
    `--seed`. The queue and its position are buffers, so they are in every checkpoint and a
    resumed run continues with the same entries."""

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Any = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        start = torch.randn(
            o.queue_size, o.projection_dim, generator=torch.Generator().manual_seed(config.seed)
        )
        self.register_buffer("queue", F.normalize(start, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the (all processes') keys, normalised, over the oldest entries, wrapping around."""
        keys = F.normalize(gather_no_grad(keys.float()), dim=1)[: len(self.queue)]
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))


def cropped_view_size(
    config: PretrainConfig, options: Any, image_size: tuple[int, int]
) -> tuple[int, int]:
    """Views of `--crop-size` pixels (fewer pixels per step; global pooling makes the encoder
    size-agnostic, and evaluation still encodes whole images), else the images' own size."""
    if options.crop_size is None:
        return image_size
    if config.backbone in VIT_SIZES:
        raise SelfsupError(
            f"--crop-size needs a convolutional backbone; {config.backbone}'s position "
            "embeddings fix its input size"
        )
    return options.crop_size, options.crop_size
