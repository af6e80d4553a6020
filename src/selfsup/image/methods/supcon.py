"""Supervised contrastive learning (Khosla et al., 2020): SimCLR whose positives include the class.

Labeled samples are positives of every sample (and view) of their class; unlabeled samples
(label -1) only of their own other view, as in SimCLR. The loss is `info_nce` (the L_out form).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from selfsup.image.config import PretrainConfig
from selfsup.image.losses.contrastive import info_nce, supcon_ids
from selfsup.image.methods.simclr import Options, SimCLR, both


class SupCon(SimCLR):
    Options = Options  # SimCLR's, its views too

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        if data_info["dataset"]["num_classes"] == 0:
            warnings.warn(
                f"supcon: --data {config.data} has no labels, so supcon is the same as simclr",
                stacklevel=2,
            )

    def batch_loss(self, y: Tensor, z: Tensor) -> Tensor:  # SimCLR's views and embeddings
        return info_nce(both(z), supcon_ids(y).repeat(2), self.options.temperature)
