"""Colorization (Zhang, Isola & Efros, 2016): predict an image's colours from its lightness.

The encoder sees only L of CIE Lab (kornia.color.rgb_to_lab); a small head on its last
feature map predicts, at a quarter of the image resolution as in the paper, a distribution
over the ab colours quantised in `--ab-grid` bins (the 261 bins of side 10 that sRGB reaches;
the paper's gamut hull gives 313). The exported encoder converts RGB to L itself (its config
says `lightness`), so `selfsup.load`, `embed` and `evaluate` feed it RGB like any other run.

Classification, not regression: colour is ambiguous (a shirt may be red or blue), and an L2
regression predicts the mean of the possible colours -- grey-brown, desaturated images -- and
is dominated by the many near-grey pixels of natural images. A distribution over bins keeps
several modes; cross-entropy against soft targets (each pixel's 5 nearest bins, Gaussian
weights, sigma 5) with class rebalancing (each pixel weighted by the inverse of the smoothed
colour prior mixed with a uniform one, `--rebalance` lambda = 0.5) makes rare saturated colours
count. Zhang et al. measured the prior on ImageNet once; here it is the running count of the
colours seen so far in training (kept in the checkpoint, so resumed runs agree). Colours shown
in the samples are the annealed mean of the distribution (temperature 0.38).

Colour augmentations would change the colours to predict, so the method's default views are
`light` (crop and flip); an explicit `--recipe` is used as given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kornia.color import lab_to_rgb, rgb_to_lab
from torch import Tensor, nn

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.image import draw
from selfsup.image.config import PretrainConfig
from selfsup.image.methods.base import Method
from selfsup.image.models.vit import VIT_SIZES


@dataclass
class Options:
    """Colorization's own options: the ab colour bins and class rebalancing."""

    ab_grid: float = option(10.0, "side of an ab colour bin (Zhang et al.: 10)", check=">0")
    rebalance: float = option(
        0.5,
        "class rebalancing, mix of uniform in the prior (1: no rebalancing)",
        check="[0,1]",
    )


NEIGHBOURS, SIGMA = 5, 5.0  # soft encoding and prior smoothing, as in the paper
TEMPERATURE = 0.38  # annealed mean: between the mean (1) and the mode (0)
L_MEAN, L_STD = 0.5, 1.0  # the paper's input normalisation (L - 50) / 100, in units of L/100


def ab_bins(grid: float, levels: int = 64) -> Tensor:
    """Centres (Q×2, multiples of `grid`) of the ab bins that some sRGB colour falls into,
    found by converting a levels³ cube of RGB colours to Lab."""
    return _ab_bins(float(grid), levels).clone()


@functools.lru_cache(maxsize=4)
def _ab_bins(grid: float, levels: int) -> Tensor:
    v = torch.linspace(0, 1, levels)
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, -1, 1)
    cells = torch.round(rgb_to_lab(rgb)[1:].reshape(2, -1).T / grid)
    return cells.unique(dim=0) * grid


def soft_encode(ab: Tensor, centres: Tensor, k: int = NEIGHBOURS, sigma: float = SIGMA) -> Tensor:
    """ab B×2×h×w -> soft targets B×Q×h×w: Gaussian weights on each pixel's k nearest bins."""
    b, _, h, w = ab.shape
    pixels = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    distances, nearest = torch.cdist(pixels, centres.to(ab)).topk(k, largest=False)
    weights = torch.softmax(-(distances**2) / (2 * sigma**2), dim=1)
    targets = torch.zeros(len(pixels), len(centres), device=ab.device, dtype=ab.dtype)
    targets.scatter_(1, nearest, weights)
    return targets.view(b, h, w, -1).permute(0, 3, 1, 2)


def decode_ab(logits: Tensor, centres: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """Logits B×Q×h×w -> ab B×2×h×w: the mean of the distribution sharpened by 1/temperature."""
    probabilities = torch.softmax(logits.float() / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", probabilities, centres.to(probabilities))


def rebalancing_weights(counts: Tensor, centres: Tensor, mix: float) -> Tensor:
    """Per-bin weights (Q): 1 / ((1 - mix)·p̃ + mix/Q) with p̃ the counts' distribution smoothed
    by a Gaussian (sigma 5) in ab space, scaled so that the p̃-weighted mean weight is 1."""
    kernel = torch.exp(-(torch.cdist(centres, centres) ** 2) / (2 * SIGMA**2))
    smoothed = kernel @ (counts / counts.sum().clamp_min(1))
    smoothed = smoothed / smoothed.sum()
    weights = 1 / ((1 - mix) * smoothed + mix / len(centres))
    return weights / (smoothed * weights).sum()


def to_lab(x: Tensor) -> tuple[Tensor, Tensor]:
    """(L B×1×H×W in [0, 100], ab B×2×H×W) of uint8 or float [0, 1] RGB images."""
    rgb = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    lab = rgb_to_lab(rgb)
    return lab[:, :1], lab[:, 1:]


class ColorHead(nn.Sequential):
    """Feature map B×D×h×w -> bin logits B×Q×size: conv, bilinear upsampling, conv, 1×1 conv."""

    def __init__(self, in_dim: int, bins: int, size: tuple[int, int], width: int = 128) -> None:
        super().__init__(
            nn.Conv2d(in_dim, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
            nn.Upsample(size=size, mode="bilinear", align_corners=False),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
            nn.Conv2d(width, bins, 1),
        )


class Colorization(Method):
    Options = Options
    default_recipe = "light"  # colour jitter and grayscale would change the colours to predict

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        options = options if options is not None else Options()
        dataset, encoder = data_info["dataset"], data_info["encoder"]
        config = self.with_defaults(config)
        _check_options(config, options, dataset, encoder)
        encoder = {**encoder, "lightness": True, "mean": [L_MEAN], "std": [L_STD]}
        super().__init__(config, {**data_info, "encoder": encoder}, options)
        h, w = dataset["image_size"]
        self.register_buffer("centres", ab_bins(options.ab_grid))
        # The running colour prior (bin counts of the training targets seen so far).
        self.register_buffer("counts", torch.zeros(len(self.centres)))
        self.target_size = (max(1, h // 4), max(1, w // 4))
        self.head = ColorHead(self.encoder.feature_dim, len(self.centres), self.target_size)

    def feature_map(self, lightness: Tensor) -> Tensor:
        """The encoder's last feature map (B×D×h×w) of L (B×1×H×W, in [0, 100]); its spatial
        mean is the encoder's output."""
        x = (lightness / 100 - self.encoder.mean) / self.encoder.std
        for stage in self.encoder.blocks():
            x = stage(x)
        return x

    def predict(self, lightness: Tensor) -> tuple[Tensor, Tensor]:
        """(bin logits B×Q×h/4×w/4, encoder features B×D) of L B×1×H×W."""
        maps = self.feature_map(lightness)
        return self.head(maps).float(), maps.mean(dim=(2, 3))

    def targets(self, ab: Tensor) -> Tensor:
        """ab B×2×H×W at the prediction's resolution (the mean of each region)."""
        return F.adaptive_avg_pool2d(ab, self.target_size)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        lightness, ab = to_lab(self.views(x, g))
        logits, features = self.predict(lightness)
        soft = soft_encode(self.targets(ab), self.centres)
        hard = soft.argmax(dim=1)  # each pixel's nearest bin
        with torch.no_grad():
            batch_counts = torch.bincount(hard.flatten(), minlength=len(self.centres)).float()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(batch_counts)  # one prior on every process
            self.counts += batch_counts
            weights = rebalancing_weights(self.counts, self.centres, self.options.rebalance)
        cross_entropy = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1)
        accuracy = (logits.argmax(dim=1) == hard).float().mean()
        self.log("train/color_acc", accuracy, prog_bar=True)
        return (weights[hard] * cross_entropy).mean(), features

    def colorize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(L as a gray image B×1×H×W in [0, 1], predicted colour image B×3×H×W in [0, 1]): the
        predicted ab, upsampled bilinearly, on the full-resolution L."""
        lightness, _ = to_lab(x)
        logits, _ = self.predict(lightness)
        ab = F.interpolate(
            decode_ab(logits, self.centres), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return lightness / 100, lab_to_rgb(torch.cat([lightness, ab], dim=1)).clamp(0, 1)

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Rows: the L input, the predicted colours, the true image."""
        with torch.no_grad():
            lightness, colour = self.colorize(x)
        rows = [("L input", lightness), ("predicted", colour), ("ground truth", x.float() / 255)]
        draw.image_rows(rows, path)


def _check_options(config: PretrainConfig, options: Options, dataset: dict, encoder: dict) -> None:
    # Identical statistics in all three channels: gray images stored as RGB. (A run being
    # reloaded, e.g. by `selfsup samples`, has the L encoder's statistics instead.)
    gray = not encoder.get("lightness") and len({*encoder["mean"]}) == len({*encoder["std"]}) == 1
    if dataset["channels"] != 3 or gray:
        kind = "grayscale" if dataset["channels"] == 3 else f"{dataset['channels']}-channel"
        raise SelfsupError(
            f"--data {config.data} has {kind} images: colorization predicts colour from "
            "lightness and needs colour (RGB) images"
        )
    if config.backbone in VIT_SIZES or ":" in config.backbone:  # not timm:/torchvision: either
        raise SelfsupError(
            f"--backbone {config.backbone}: colorization needs one of selfsup's convolutional "
            "backbones (convnet, convnet-wide, resnet18, resnet50) for its per-pixel head"
        )
    if not 2 <= options.ab_grid <= 50:
        raise SelfsupError(
            f"--ab-grid is in ab units, between 2 and 50 (paper: 10), got {options.ab_grid}"
        )
    if not 0 < options.rebalance <= 1:
        raise SelfsupError(
            f"--rebalance mixes a uniform prior in and must be in (0, 1] (1: none), "
            f"got {options.rebalance}"
        )
