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
    """The other images' views are negatives: `--accumulate` caches gradients (exact)."""

    Options = Options
    grad_cache = True

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return cropped_view_size(self.config, self.options, image_size)

    def cache_inputs(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, ...]:
        return (view_pairs(self, x, g),)

    def embed(self, pairs: Tensor) -> tuple[Tensor, ...]:
        """(view 1's encoder features, N×2×D projections) of N×2×C×H×W view pairs."""
        features = self.encoder(both(pairs))
        return features[: len(pairs)], per_image(self.projection(features), len(pairs))

    def batch_loss(self, y: Tensor, z: Tensor) -> Tensor:
        return nt_xent(z[:, 0], z[:, 1], self.options.temperature)


def view_pairs(method: Siamese, x: Tensor, g: torch.Generator) -> Tensor:
    """N×2×C×H×W: two views of each image of x (every first view drawn before the second)."""
    return torch.stack([method.views(x, g), method.views(x, g)], dim=1)


def both(pairs: Tensor) -> Tensor:
    """2N×...: the first of N pairs, then the second (`Siamese.two_views`' order)."""
    return pairs.transpose(0, 1).flatten(0, 1)


def per_image(rows: Tensor, n: int) -> Tensor:
    """N×2×...: `both`'s rows back in pairs."""
    return rows.unflatten(0, (2, n)).transpose(0, 1)
