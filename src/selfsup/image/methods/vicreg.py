"""VICReg (Bardes, Ponce & LeCun, 2022): two views through a shared encoder and expander;
their embeddings are pulled together (invariance) while every dimension keeps a standard
deviation of at least 1 over the batch (variance) and the dimensions are decorrelated
(covariance). No negatives, no stop-gradient, no momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses.noncontrastive import vicreg
from selfsup.image.methods.siamese import Siamese, cropped_view_size


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


class VICReg(Siamese):
    Options = Options
    projection_layers = 3

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return cropped_view_size(self.config, self.options, image_size)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        e, o = self.embed_views(x, g), self.options
        return vicreg(*e.z.chunk(2), o.invariance, o.variance, o.covariance), e.features[: len(x)]
