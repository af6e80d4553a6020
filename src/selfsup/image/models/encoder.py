"""Encoder: input normalisation + backbone, rebuildable from its config."""

import torch
from torch import nn

from selfsup.core.errors import SelfsupError
from selfsup.image.models.backbones import backbone_stages, build_backbone


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
        patch_size: int | None = None,
        lightness: bool = False,
    ) -> None:
        super().__init__()
        # lightness (colorization): the backbone sees only L of CIE Lab, computed here from the
        # RGB input, so the encoder takes RGB like every other run's; mean/std are then of L/100.
        if lightness and in_channels != 3:
            raise SelfsupError(f"encoder: lightness needs RGB input, got {in_channels} channels")
        backbone_channels = 1 if lightness else in_channels
        if len(mean) != backbone_channels or len(std) != backbone_channels:
            raise SelfsupError(
                f"encoder: mean/std need {backbone_channels} values, got {len(mean)}/{len(std)}"
            )
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        self.config = dict(
            backbone=backbone,
            in_channels=in_channels,
            small_images=small_images,
            mean=mean,
            std=std,
        )
        # only the linear backbone, ViTs and timm/torchvision models depend on the image size
        if image_size is not None:
            self.config.update(image_size=list(image_size), feature_dim=feature_dim)
        if patch_size is not None:  # ViTs
            self.config.update(patch_size=patch_size)
        if lightness:
            self.config.update(lightness=True)
        self.lightness = lightness
        self.backbone, self.feature_dim = build_backbone(
            backbone,
            backbone_channels,
            small_images=small_images,
            image_size=image_size,
            feature_dim=feature_dim,
            patch_size=patch_size,
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def use_channels_last(self) -> None:
        """Keep a conv backbone and its inputs in channels_last (NHWC) memory: faster convolutions
        on CPUs and GPUs alike (measured in benchmarks/train_step.py); other backbones unchanged."""
        from selfsup.image.models.external import TimmViT
        from selfsup.image.models.vit import ViT

        convolutional = any(isinstance(m, nn.Conv2d) for m in self.backbone.modules())
        if convolutional and not isinstance(self.backbone, (ViT, TimmViT)):  # nor linear
            self.backbone.to(memory_format=torch.channels_last)
            self.channels_last = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255
        if self.lightness:
            x = lab_lightness(x)
        x = (x - self.mean) / self.std
        if getattr(self, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def blocks(self) -> list[nn.Module]:
        """Ordered top-level stages (ConvNet: 4 blocks; ResNet: stem, layer1..layer4)."""
        return backbone_stages(self.backbone)


def lab_lightness(rgb: torch.Tensor) -> torch.Tensor:
    """L of CIE Lab over 100 (in [0, 1]) of sRGB images in [0, 1]: B×3×H×W -> B×1×H×W."""
    from kornia.color import rgb_to_lab  # imported here: only colorization encoders need it

    return rgb_to_lab(rgb)[:, :1] / 100
