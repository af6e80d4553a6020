"""Supervised contrastive learning (Khosla et al., 2020): SimCLR whose positives include the class.

Labeled samples are positives of every sample (and view) of their class; unlabeled samples
(label -1) only of their own other view, as in SimCLR. The loss is `info_nce` (the L_out form).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from selfsup.image.config import PretrainConfig
from selfsup.image.losses.contrastive import info_nce, supcon_ids
from selfsup.image.methods.base import Method
from selfsup.image.methods.simclr import Options, cropped_view_size
from selfsup.image.models import ProjectionHead


class SupCon(Method):
    Options = Options  # SimCLR's

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        self.projection = ProjectionHead(
            self.encoder.feature_dim, self.options.projection_hidden, self.options.projection_dim
        )
        if data_info["dataset"]["num_classes"] == 0:
            warnings.warn(
                f"supcon: --data {config.data} has no labels, so supcon is the same as simclr",
                stacklevel=2,
            )

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return cropped_view_size(self.config, self.options, image_size)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        views = torch.cat([self.views(x, g), self.views(x, g)])
        features = self.encoder(views)
        z = self.projection(features)
        ids = supcon_ids(y).repeat(2)
        return info_nce(z, ids, self.options.temperature), features[: len(x)]
