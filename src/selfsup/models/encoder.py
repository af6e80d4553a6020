"""Encoder: input normalisation + backbone, rebuildable from its config."""

import torch
from torch import nn

from selfsup.errors import SelfsupError
from selfsup.models.backbones import backbone_stages, build_backbone


class Encoder(nn.Module):
    """Maps uint8 or float-[0,1] images B×C×H×W to features B×D (normalises per channel first)."""

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        *,
        small_images: bool,
        mean: list[float],
        std: list[float],
        image_size: list[int] | None = None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise SelfsupError(
                f"encoder: mean/std need {in_channels} values, got {len(mean)}/{len(std)}"
            )
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        self.config = dict(
            backbone=backbone,
            in_channels=in_channels,
            small_images=small_images,
            mean=mean,
            std=std,
        )
        if image_size is not None:  # only the linear backbone depends on the image size
            self.config.update(image_size=list(image_size), feature_dim=feature_dim)
        self.backbone, self.feature_dim = build_backbone(
            backbone,
            in_channels,
            small_images=small_images,
            image_size=image_size,
            feature_dim=feature_dim,
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255
        return self.backbone((x - self.mean) / self.std)

    def blocks(self) -> list[nn.Module]:
        """Ordered top-level stages (ConvNet: 4 blocks; ResNet: stem, layer1..layer4)."""
        return backbone_stages(self.backbone)
