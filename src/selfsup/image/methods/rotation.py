"""Rotation prediction (Gidaris et al., 2018): which of 0/90/180/270° was an image turned by?

Each image of the batch (after the run's augmentation recipe; `--recipe none` for none) appears
in all four rotations, so the batch holds 4B inputs and the four classes are balanced. Rotating
a non-square image by 90° changes its shape, so non-square images are centre-cropped to a square
first (the four classes stay; the border is lost for this task only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from selfsup.image import draw
from selfsup.image.config import PretrainConfig
from selfsup.image.data.transforms import unit_float
from selfsup.image.methods.base import Method

ANGLES = (0, 90, 180, 270)


def center_square(x: Tensor) -> Tensor:
    """The largest centred square of B×C×H×W images (x itself when H = W)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top : top + s, left : left + s]


def rotate_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """(4B images, 4B labels): block k holds every image rotated by k·90° (torch.rot90, k times
    over dims (H, W)) and has label k."""
    x = center_square(x)
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rotated, labels


class Rotation(Method):
    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Any = None
    ) -> None:
        super().__init__(config, data_info, options)
        self.classifier = nn.Linear(self.encoder.feature_dim, len(ANGLES))

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs, labels = rotate_batch(self.views(x, g))
        features = self.encoder(inputs)
        logits = self.classifier(features).float()
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log("train/rotation_acc", accuracy, prog_bar=True)
        return F.cross_entropy(logits, labels), features[: len(x)]

    def save_samples(self, x: Tensor, path: Path) -> None:
        """One row per image: its four rotations, titled with the predicted angle (green when
        right, red when wrong)."""
        inputs, labels = rotate_batch(unit_float(x))
        with torch.no_grad():
            predicted = self.classifier(self.encoder(inputs)).argmax(1)
        n = len(x)
        fig = Figure(figsize=(1.6 * len(ANGLES), 1.7 * n + 0.3), layout="constrained")
        fig.suptitle("rotated by 0°, 90°, 180°, 270°; title: predicted angle", fontsize=9)
        axes = np.asarray(fig.subplots(n, len(ANGLES), squeeze=False))
        for k in range(len(ANGLES)):
            for i in range(n):
                j = k * n + i
                draw.show(axes[i, k], inputs[j].cpu())
                right = bool(predicted[j] == labels[j])
                axes[i, k].set_title(
                    f"{ANGLES[int(predicted[j])]}°", fontsize=9, color="green" if right else "red"
                )
        draw.save(fig, path)
