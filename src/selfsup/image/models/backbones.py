"""Backbone networks: a small CPU-friendly ConvNet, torchvision ResNets and ViTs (vit.py); any
timm or torchvision model by name (`timm:NAME`, `torchvision:NAME`: external.py)."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet, resnet18, resnet50

from selfsup.core.errors import SelfsupError
from selfsup.image.models.external import ExternalBackbone, build_external, is_external, resolve
from selfsup.image.models.vit import VIT_SIZES, ViT, build_vit


class _Downsample(nn.Module):
    """2×2 max-pool, skipped once the feature map is 2 pixels or smaller (tiny inputs like 8×8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) > 2 else x


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]


class ConvNet(nn.Module):
    """Four conv3×3-BN-ReLU blocks (widths 32-64-128-256), max-pool between, global average pool."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        blocks, c_in = [], in_channels
        for i, c_out in enumerate(widths):
            blocks.append(
                nn.Sequential(*([_Downsample()] if i else []), *_conv_bn_relu(c_in, c_out))
            )
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))


def _resnet(factory: Callable[..., ResNet], in_channels: int, small_images: bool) -> ResNet:
    net = factory(weights=None)
    if small_images:  # CIFAR stem: 3×3 stride-1 conv, no max-pool
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


BACKBONES: dict[str, Callable[[int, bool], tuple[nn.Module, int]]] = {
    "convnet": lambda c, small: (ConvNet(c), 256),
    # The same ConvNet with a 1024-channel last block: 4× the features for a linear probe; the
    # last block runs on a 3×3 map at 24 px, so a step costs ~1.4× (benchmarks/RESULTS.md).
    "convnet-wide": lambda c, small: (ConvNet(c, (32, 64, 128, 1024)), 1024),
    "resnet18": lambda c, small: (_resnet(resnet18, c, small), 512),
    "resnet50": lambda c, small: (_resnet(resnet50, c, small), 2048),
    # ViTs (mae): build_backbone passes them the image and patch size their positions need.
    **{name: partial(build_vit, name, image_size=None, patch_size=None) for name in VIT_SIZES},
}


def linear_backbone(in_channels: int, image_size: list[int], feature_dim: int) -> nn.Sequential:
    """One linear map of the flattened pixels: the encoder of a linear autoencoder (PCA's kin)."""
    h, w = image_size
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * h * w, feature_dim))


def build_backbone(
    name: str,
    in_channels: int,
    *,
    small_images: bool,
    image_size: list[int] | None = None,
    feature_dim: int | None = None,
    patch_size: int | None = None,
) -> tuple[nn.Module, int]:
    """Randomly initialised backbone mapping B×C×H×W to B×D; returns (module, D).

    "linear" (not listed in BACKBONES: only the linear autoencoder builds it) also needs the
    image size and the feature dimension; the ViTs need the image and patch size.
    """
    if name == "linear" and image_size is not None and feature_dim is not None:
        return linear_backbone(in_channels, image_size, feature_dim), feature_dim
    if name in VIT_SIZES:
        return build_vit(name, in_channels, image_size, patch_size)
    if is_external(name):  # their own stems: small_images does not apply
        return build_external(name, in_channels, image_size, patch_size)
    if name not in BACKBONES:
        raise SelfsupError(
            f"backbone: unknown {name!r}; expected one of {', '.join(BACKBONES)}, timm:NAME or "
            "torchvision:NAME"
        )
    return BACKBONES[name](in_channels, small_images)


def check_backbone(name: str) -> None:
    """One line unless `name` is a backbone: one of BACKBONES, or a timm/torchvision model."""
    if is_external(name):
        resolve(name)
    elif name not in BACKBONES:
        raise SelfsupError(
            f"--backbone {name!r} is unknown; expected one of {', '.join(BACKBONES)}, "
            "timm:NAME or torchvision:NAME"
        )


def backbone_size(name: str | None, image_size: list[int]) -> dict[str, list[int]]:
    """The encoder settings a backbone needs beside its name: the image size of a timm or
    torchvision model (ViTs are built for it), nothing for selfsup's own."""
    return {"image_size": list(image_size)} if is_external(name) else {}


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """Ordered top-level stages of a backbone built here (to unfreeze the last K)."""
    if isinstance(backbone, ConvNet):
        return list(backbone.blocks)
    if isinstance(backbone, ResNet):
        b = backbone
        stem = nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool)
        return [stem, b.layer1, b.layer2, b.layer3, b.layer4]
    if isinstance(backbone, (ViT, ExternalBackbone)):
        return backbone.stages()
    if isinstance(backbone, nn.Sequential):  # the linear backbone
        return [backbone]
    raise TypeError(f"no stages known for {type(backbone).__name__}")
