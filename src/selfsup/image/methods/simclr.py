"""SimCLR (Chen et al., 2020): two augmented views, encode, project, InfoNCE over the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses import nt_xent
from selfsup.image.methods.siamese import Siamese, cropped_view_size


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


class SimCLR(Siamese):
    Options = Options

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return cropped_view_size(self.config, self.options, image_size)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        e = self.embed_views(x, g)
        return nt_xent(*e.z.chunk(2), self.options.temperature), e.features[: len(x)]
