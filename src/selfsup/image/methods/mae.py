"""Masked autoencoder (He et al., 2022): hide most patches, encode the rest, rebuild the hidden.

The encoder is a ViT (`--backbone vit-mini|vit-tiny|vit-small|vit-base`; by default vit-mini,
the size that trains on a CPU) over `--patch-size` patches. Each step hides a
random `--mask-ratio` of every image's patches (argsort of uniform noise, so exactly the same
number per image); the encoder sees only the visible patches; a light decoder gets the encoded
tokens plus a shared mask token at every hidden position and predicts their pixels; the loss is
the MSE on hidden patches only, against targets normalised per patch (`--norm-pix-loss`, on by
default) or raw [0, 1] pixels. The exported encoder runs the ViT on all patches and returns the
mean of its output tokens. It draws no augmented views, so it refuses a `--recipe`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.image import draw
from selfsup.image.config import PretrainConfig
from selfsup.image.data.transforms import unit_float
from selfsup.image.methods.base import Method
from selfsup.image.models.vit import (
    VIT_SIZES,
    ViT,
    check_patch_size,
    init_weights,
    layer_norm,
    sincos_positions,
    transformer,
)


@dataclass
class Options:
    """MAE's own options: patches, masking and the light decoder."""

    patch_size: int = option(
        4, "ViT patch side in pixels (must divide the image size)", check=">=1"
    )
    mask_ratio: float = option(0.75, "fraction of patches hidden from the encoder", check="(0,1)")
    norm_pix_loss: bool = option(True, "normalise each target patch by its mean and std")
    decoder_dim: int = option(128, "width of the light decoder")
    decoder_depth: int = option(2, "transformer blocks of the decoder")


def patchify(x: Tensor, p: int) -> Tensor:
    """B×C×H×W -> B×N×(p·p·C): row-major patches, each flattened as (row, column, channel)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, p: int, channels: int, grid: tuple[int, int]) -> Tensor:
    """The inverse of `patchify`."""
    b = len(patches)
    x = patches.reshape(b, grid[0], grid[1], p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid[0] * p, grid[1] * p)


def random_masking(
    batch: int, patches: int, ratio: float, g: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """(visible ids B×n_keep, restore ids B×N, mask B×N with 1 = hidden), n_keep = N·(1-ratio).

    Sorting uniform noise gives each image a random permutation of its patches; the first
    n_keep stay visible. `restore` inverts the permutation (put tokens back in patch order).
    """
    keep = int(patches * (1 - ratio))
    shuffle = torch.rand(batch, patches, generator=g, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, patches, device=device)
    mask[:, :keep] = 0
    return shuffle[:, :keep], restore, torch.gather(mask, 1, restore)


def patch_targets(patches: Tensor, normalise: bool) -> Tensor:
    """Targets per patch: pixels, or pixels minus the patch mean over the patch std."""
    if not normalise:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as in MAE
    return (patches - mean) / (var + 1e-6) ** 0.5


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over hidden patches of the per-patch mean squared error."""
    per_patch = ((prediction - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def _gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


class MAEDecoder(nn.Module):
    """Encoded visible tokens -> pixels of every patch (mask tokens fill the hidden positions)."""

    def __init__(self, vit: ViT, dim: int, depth: int, heads: int, patch_pixels: int) -> None:
        super().__init__()
        self.embed = nn.Linear(vit.dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("positions", sincos_positions(vit.grid, dim), persistent=False)
        self.blocks = transformer(dim, depth, heads)
        self.norm = layer_norm(dim)
        self.predict = nn.Linear(dim, patch_pixels)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: Tensor, restore: Tensor) -> Tensor:
        x = self.embed(encoded)
        hidden = self.mask_token.expand(len(x), restore.shape[1] - x.shape[1], -1)
        x = _gather_tokens(torch.cat([x, hidden.to(x.dtype)], dim=1), restore)
        return self.predict(self.norm(self.blocks(x + self.positions.to(x.dtype))))


class MAE(Method):
    Options = Options
    default_recipe = None  # masking is the only corruption
    default_backbone = "vit-mini"

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        options = options if options is not None else Options()
        config = self.with_defaults(config)
        backbone = config.backbone
        if backbone not in VIT_SIZES and not backbone.startswith("timm:"):
            raise SelfsupError(
                f"--backbone {config.backbone}: mae needs a ViT, one of {', '.join(VIT_SIZES)} "
                "or a timm ViT (timm:vit_tiny_patch16_224, ...)"
            )
        if not 0 < options.mask_ratio < 1:
            raise SelfsupError(f"--mask-ratio must be between 0 and 1, got {options.mask_ratio}")
        if options.decoder_dim < 1 or options.decoder_dim % 32:
            raise SelfsupError(
                f"--decoder-dim must be a positive multiple of 32, got {options.decoder_dim}"
            )
        if options.decoder_depth < 1:
            raise SelfsupError(f"--decoder-depth must be at least 1, got {options.decoder_depth}")
        size = data_info["dataset"]["image_size"]
        check_patch_size(size, options.patch_size)
        patches = (size[0] // options.patch_size) * (size[1] // options.patch_size)
        if int(patches * (1 - options.mask_ratio)) < 1:
            raise SelfsupError(
                f"--mask-ratio {options.mask_ratio} leaves no visible patch of the {patches}; "
                "lower it or use a smaller --patch-size"
            )
        config = dataclasses.replace(config, backbone=backbone)
        encoder = {**data_info["encoder"], "backbone": backbone}
        encoder.update(image_size=list(size), patch_size=options.patch_size)
        super().__init__(config, {**data_info, "encoder": encoder}, options)
        self.vit: ViT = self.encoder.backbone  # type: ignore[assignment]
        if not hasattr(self.vit, "embed"):  # a timm model without ViT patch tokens
            raise SelfsupError(
                f"--backbone {backbone}: mae needs a ViT's patch tokens; this timm model has "
                "none (timm's VisionTransformer family has: timm:vit_tiny_patch16_224, ...)"
            )
        channels = data_info["dataset"]["channels"]
        self.decoder = MAEDecoder(
            self.vit,
            options.decoder_dim,
            options.decoder_depth,
            heads=options.decoder_dim // 32,
            patch_pixels=options.patch_size**2 * channels,
        )

    def forward_mae(self, x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(per-patch predictions B×N×P, targets B×N×P, mask B×N, visible features B×D)."""
        pixels = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        tokens = self.vit.embed((pixels - self.encoder.mean) / self.encoder.std)
        visible, restore, mask = random_masking(
            len(x), tokens.shape[1], self.options.mask_ratio, g, x.device
        )
        encoded = self.vit.encode(_gather_tokens(tokens, visible))
        prediction = self.decoder(encoded, restore)
        targets = patch_targets(patchify(pixels, self.vit.patch_size), self.options.norm_pix_loss)
        return prediction.float(), targets, mask, encoded.mean(dim=1)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """The online probe sees the mean of the encoded *visible* tokens (a monitor only: the
        exported encoder pools all tokens; one extra full pass per step is not worth it)."""
        prediction, targets, mask, features = self.forward_mae(x, g)
        return masked_mse(prediction, targets, mask), features

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Rows: the image, what the encoder sees, the prediction of the hidden patches pasted
        into the visible ones, and the ground truth. With --norm-pix-loss the predicted patches
        are put back on each true patch's mean and std (as MAE's own visualisation does)."""
        g = torch.Generator(device=x.device).manual_seed(self.config.seed)
        with torch.no_grad():
            prediction, _, mask, _ = self.forward_mae(x, g)
        p, grid, channels = self.vit.patch_size, self.vit.grid, x.shape[1]
        truth = patchify(unit_float(x), p)
        if self.options.norm_pix_loss:
            mean = truth.mean(dim=-1, keepdim=True)
            std = (truth.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            prediction = prediction * std + mean
        hidden = mask[..., None].bool()
        rows = [
            ("masked input", torch.where(hidden, 0.5, truth)),
            ("reconstruction", torch.where(hidden, prediction, truth)),
            ("ground truth", truth),
        ]
        draw.image_rows(
            [(label, unpatchify(patches, p, channels, grid)) for label, patches in rows], path
        )
