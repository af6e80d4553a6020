"""Autoencoder: encode to a small code, decode, and reconstruct the clean image (MSE).

`--denoise STD` corrupts the input only (Gaussian noise, clipped to [0, 1]): a denoising
autoencoder. `--linear-autoencoder` makes encoder and decoder two affine maps of the pixels (the
run's encoder is then the "linear" backbone, so `selfsup.load` returns the learned code); trained
with MSE, its decoder spans the same subspace as PCA's top `--code-dim` components (Baldi &
Hornik, 1989): autoencoders generalise PCA from linear to nonlinear.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.image import draw
from selfsup.image.config import PretrainConfig
from selfsup.image.data import ImageData
from selfsup.image.data.transforms import unit_float
from selfsup.image.methods.base import Method
from selfsup.image.models.decoders import ConvDecoder


@dataclass
class Options:
    """The autoencoder's own options."""

    code_dim: int = option(64, "size of the code (bottleneck)", check=">=1")
    linear_autoencoder: bool = option(
        False, "linear encoder and decoder on pixels (learns PCA's subspace)"
    )
    denoise: float = option(0.0, "std of Gaussian noise added to its input", check=">=0")


class Autoencoder(Method):
    Options = Options
    default_recipe = None  # it reconstructs the image itself (--denoise corrupts it)

    @classmethod
    def encoder_spec(cls, config: PretrainConfig, options: Options, data: ImageData) -> dict:
        """A linear autoencoder's encoder is one affine map of the pixels to its code."""
        if not options.linear_autoencoder:
            return {}
        return {
            "backbone": "linear",
            "image_size": list(data.image_size),
            "feature_dim": options.code_dim,
        }

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        options, dataset = self.options, data_info["dataset"]
        self.image_shape = (dataset["channels"], *dataset["image_size"])
        pixels = int(np.prod(self.image_shape))
        if options.code_dim < 1:
            raise SelfsupError(f"--code-dim must be at least 1, got {options.code_dim}")
        if options.denoise < 0:
            raise SelfsupError(f"--denoise is a noise std and must be >= 0, got {options.denoise}")
        if options.linear_autoencoder:
            if options.code_dim >= pixels:
                raise SelfsupError(
                    f"--code-dim {options.code_dim} is not below the {pixels} pixels of the "
                    "images: a linear autoencoder would learn the identity; lower --code-dim"
                )
            # self.encoder is the linear backbone (normalise, flatten, affine map to the code);
            # the biases absorb the centring that PCA does explicitly.
            self.decoder = nn.Linear(options.code_dim, pixels)
        else:
            self.code = nn.Linear(self.encoder.feature_dim, options.code_dim)
            self.decoder = ConvDecoder(options.code_dim, dataset["channels"], self.image_shape[1:])

    def corrupt(self, x: Tensor, g: torch.Generator) -> Tensor:
        """The autoencoder's input: x (float [0, 1]) plus Gaussian noise when denoising."""
        if self.options.denoise <= 0:
            return x
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return (x + self.options.denoise * noise).clamp(0, 1)

    def reconstruct(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction B×C×H×W, features for the probe) of float [0, 1] inputs."""
        features = self.encoder(inputs)
        if self.options.linear_autoencoder:
            return self.decoder(features).view(inputs.shape), features
        return self.decoder(self.code(features)), features

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        clean = unit_float(x)
        reconstruction, features = self.reconstruct(self.corrupt(clean, g))
        return F.mse_loss(reconstruction.float(), clean), features

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Rows: the images, their noisy inputs (when denoising), their reconstructions."""
        g = torch.Generator(device=x.device).manual_seed(self.config.seed)
        clean = unit_float(x)
        inputs = self.corrupt(clean, g)
        with torch.no_grad():
            reconstruction, _ = self.reconstruct(inputs)
        rows = [("input", clean)]
        if self.options.denoise > 0:
            rows.append((f"noisy (std {self.options.denoise:g})", inputs))
        rows.append(("reconstruction", reconstruction.clamp(0, 1)))
        draw.image_rows(rows, path)
