"""Autoencoder: encode to a small code, decode, and reconstruct the clean image (MSE).

`--denoise STD` corrupts the input only (Gaussian noise, clipped to [0, 1]): a denoising
autoencoder. `--linear-autoencoder` makes encoder and decoder two affine maps of the pixels (the
run's encoder is then the "linear" backbone, so `selfsup.load` returns the learned code); trained
with MSE, its decoder spans the same subspace as PCA's top `--code-dim` components (Baldi &
Hornik, 1989): autoencoders generalise PCA from linear to nonlinear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from selfsup.augment.preview import _save, _show
from selfsup.config import PretrainConfig
from selfsup.errors import SelfsupError
from selfsup.methods.base import Method
from selfsup.models.decoders import ConvDecoder


class Autoencoder(Method):
    default_recipe = None  # it reconstructs the image itself (--denoise corrupts it)

    def __init__(self, config: PretrainConfig, data_info: dict[str, Any]) -> None:
        super().__init__(config, data_info)
        dataset = data_info["dataset"]
        self.image_shape = (dataset["channels"], *dataset["image_size"])
        pixels = int(np.prod(self.image_shape))
        if config.code_dim < 1:
            raise SelfsupError(f"--code-dim must be at least 1, got {config.code_dim}")
        if config.denoise < 0:
            raise SelfsupError(f"--denoise is a noise std and must be >= 0, got {config.denoise}")
        if config.linear_autoencoder:
            if config.code_dim >= pixels:
                raise SelfsupError(
                    f"--code-dim {config.code_dim} is not below the {pixels} pixels of the "
                    "images: a linear autoencoder would learn the identity; lower --code-dim"
                )
            # self.encoder is the linear backbone (normalise, flatten, affine map to the code);
            # the biases absorb the centring that PCA does explicitly.
            self.decoder = nn.Linear(config.code_dim, pixels)
        else:
            self.code = nn.Linear(self.encoder.feature_dim, config.code_dim)
            self.decoder = ConvDecoder(config.code_dim, dataset["channels"], self.image_shape[1:])

    def corrupt(self, x: Tensor, g: torch.Generator) -> Tensor:
        """The autoencoder's input: x (float [0, 1]) plus Gaussian noise when denoising."""
        if self.config.denoise <= 0:
            return x
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return (x + self.config.denoise * noise).clamp(0, 1)

    def reconstruct(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction B×C×H×W, features for the probe) of float [0, 1] inputs."""
        features = self.encoder(inputs)
        if self.config.linear_autoencoder:
            return self.decoder(features).view(inputs.shape), features
        return self.decoder(self.code(features)), features

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        clean = x.float() / 255
        reconstruction, features = self.reconstruct(self.corrupt(clean, g))
        return F.mse_loss(reconstruction.float(), clean), features

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Rows: the images, their noisy inputs (when denoising), their reconstructions."""
        g = torch.Generator(device=x.device).manual_seed(self.config.seed)
        clean = x.float() / 255
        inputs = self.corrupt(clean, g)
        with torch.no_grad():
            reconstruction, _ = self.reconstruct(inputs)
        rows = [("input", clean)]
        if self.config.denoise > 0:
            rows.append((f"noisy (std {self.config.denoise:g})", inputs))
        rows.append(("reconstruction", reconstruction.clamp(0, 1)))
        fig = Figure(figsize=(1.4 * len(x), 1.6 * len(rows)))
        axes = np.asarray(fig.subplots(len(rows), len(x), squeeze=False))
        for r, (label, images) in enumerate(rows):
            for i in range(len(x)):
                _show(axes[r, i], images[i].cpu(), label if i == 0 else None)
        _save(fig, path)
