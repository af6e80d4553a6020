"""SimCLR (Chen et al., 2020): two augmented views, encode, project, InfoNCE over the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.image.config import PretrainConfig
from selfsup.image.losses import nt_xent
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead
from selfsup.image.models.vit import VIT_SIZES


@dataclass
class Options:
    """SimCLR's own options (SupCon shares them)."""

    temperature: float = option(0.5, "InfoNCE temperature", check=">0")
    projection_dim: int = option(128, "output size of the projection head", check=">=1")
    projection_hidden: int = option(512, "hidden size of the projection head", check=">=1")
    crop_size: int | None = option(
        None,
        "side of the square views in pixels (default: the image size)",
        check=">=4",
    )


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


class SimCLR(Method):
    Options = Options

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        self.projection = ProjectionHead(
            self.encoder.feature_dim, self.options.projection_hidden, self.options.projection_dim
        )

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return cropped_view_size(self.config, self.options, image_size)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        views = torch.cat([self.views(x, g), self.views(x, g)])
        features = self.encoder(views)
        z1, z2 = self.projection(features).chunk(2)
        return nt_xent(z1, z2, self.options.temperature), features[: len(x)]
