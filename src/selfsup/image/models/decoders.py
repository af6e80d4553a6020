"""Decoders: a code vector back to an image, for autoencoders."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvDecoder(nn.Module):
    """Code B×K -> image B×C×H×W in (0, 1), for any H, W.

    A linear layer makes a low-resolution map (about 4 pixels on the long side), upsample+conv
    blocks double it until it covers H×W, a 3×3 conv gives C channels, a bilinear resize gives
    exactly H×W and a sigmoid the [0, 1] range.
    """

    def __init__(
        self, code_dim: int, channels: int, image_size: tuple[int, int], width: int = 32
    ) -> None:
        super().__init__()
        h, w = image_size
        stages = max(0, math.ceil(math.log2(max(h, w) / 4)))
        self.image_size = (h, w)
        self.start = (math.ceil(h / 2**stages), math.ceil(w / 2**stages))
        widths = [min(256, width * 2 ** (stages - i)) for i in range(stages + 1)]
        self.fc = nn.Sequential(
            nn.Linear(code_dim, widths[0] * self.start[0] * self.start[1]), nn.ReLU(True)
        )
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        self.blocks = nn.Sequential(*blocks, nn.Conv2d(widths[-1], channels, 3, padding=1))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        x = self.fc(code).view(len(code), -1, *self.start)
        x = self.blocks(x)
        if x.shape[-2:] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)
