"""VICReg (Bardes, Ponce & LeCun, 2022): two views through a shared encoder and expander;
their embeddings are pulled together (invariance) while every dimension keeps a standard
deviation of at least 1 over the batch (variance) and the dimensions are decorrelated
(covariance). No negatives, no stop-gradient, no momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.config import PretrainConfig
from selfsup.image.losses.noncontrastive import vicreg
from selfsup.image.methods.base import Method
from selfsup.image.methods.simclr import cropped_view_size
from selfsup.image.models import ProjectionHead


@dataclass
class Options:
    """VICReg's own options (the paper: an 8192-wide expander, weights 25 / 25 / 1)."""

    projection_dim: int = option(512, "output size of the expander", check=">=1")
    projection_hidden: int = option(512, "hidden size of the expander", check=">=1")
    invariance: float = option(25.0, "weight of the invariance (MSE) term", check=">=0")
    variance: float = option(25.0, "weight of the variance (std hinge) term", check=">=0")
    covariance: float = option(1.0, "weight of the covariance term", check=">=0")
    crop_size: int | None = option(
        None, "side of the square views in pixels (default: the image size)", check=">=4"
    )


class VICReg(Method):
    Options = Options

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        self.projection = ProjectionHead(
            self.encoder.feature_dim, o.projection_hidden, o.projection_dim, 3
        )

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return cropped_view_size(self.config, self.options, image_size)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        features = self.encoder(torch.cat([self.views(x, g), self.views(x, g)]))
        z1, z2 = self.projection(features).chunk(2)
        o = self.options
        return vicreg(z1, z2, o.invariance, o.variance, o.covariance), features[: len(x)]
