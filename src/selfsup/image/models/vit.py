"""A Vision Transformer over image patches, built from torchvision's `EncoderBlock`.

torchvision's own `VisionTransformer` adds a class token and a learned position embedding of
fixed length inside its `Encoder`, so it cannot run on a subset of the patches as MAE needs;
this module keeps its transformer blocks and exposes the steps (`embed`, `encode`) separately.
Positions are MAE's fixed 2-D sine-cosine embeddings; features are the mean of the output
tokens (no class token: MAE reports that average pooling works as well).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock

from selfsup.core.errors import SelfsupError

# name -> (width, depth, heads). vit-mini is the CPU size for 32-px images; the others are the
# standard ViT-Ti/S/B (Dosovitskiy et al., 2021; Touvron et al., 2021).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit-mini": (192, 6, 3),
    "vit-tiny": (192, 12, 3),
    "vit-small": (384, 12, 6),
    "vit-base": (768, 12, 12),
}

layer_norm = partial(nn.LayerNorm, eps=1e-6)


def sincos_positions(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings, (gh·gw)×dim: half the channels encode the row,
    half the column, each as sin/cos of the position at geometrically spaced frequencies."""
    if dim % 4:
        raise SelfsupError(f"ViT width {dim} must be divisible by 4 for 2-D sin-cos positions")
    frequencies = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for position in (rows.flatten(), cols.flatten()):
        angles = position[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def transformer(dim: int, depth: int, heads: int, mlp_ratio: int = 4) -> nn.Sequential:
    return nn.Sequential(
        *[EncoderBlock(heads, dim, mlp_ratio * dim, 0.0, 0.0, layer_norm) for _ in range(depth)]
    )


def check_patch_size(image_size: tuple[int, int] | list[int], patch_size: int) -> None:
    h, w = image_size
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise SelfsupError(
            f"--patch-size {patch_size} does not divide the {h}×{w} images; choose a divisor "
            "of both sides"
        )


class ViT(nn.Module):
    """Images B×C×H×W (already normalised) -> mean-pooled token features B×dim."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int] | list[int],
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
    ) -> None:
        super().__init__()
        check_patch_size(image_size, patch_size)
        self.patch_size, self.dim = patch_size, dim
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("positions", sincos_positions(self.grid, dim), persistent=False)
        self.blocks = transformer(dim, depth, heads)
        self.norm = layer_norm(dim)
        self.apply(init_weights)
        # MAE initialises the patch projection like a linear layer (xavier on the flattened view).
        nn.init.xavier_uniform_(self.patch_embed.weight.view(dim, -1))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def embed(self, x: Tensor) -> Tensor:
        """B×C×H×W -> B×N×dim patch tokens plus positions (row-major patch order)."""
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.positions.to(x.dtype)

    def encode(self, tokens: Tensor) -> Tensor:
        """Transformer blocks and the final norm over any subset of tokens, B×n×dim."""
        return self.norm(self.blocks(tokens))

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(self.embed(x)).mean(dim=1)

    def stages(self) -> list[nn.Module]:
        """Patch embedding, then each block (the last with the final norm)."""
        blocks = list(self.blocks)
        return [self.patch_embed, *blocks[:-1], nn.ModuleList([blocks[-1], self.norm])]


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linear layers, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_vit(
    name: str, in_channels: int, image_size: list[int] | None, patch_size: int | None
) -> tuple[ViT, int]:
    """A ViT of a named size; its position table needs the image and patch size."""
    if image_size is None or patch_size is None:
        raise SelfsupError(
            f"--backbone {name}: a ViT needs the image and patch size, which only the mae "
            "method sets up so far; use mae or a convolutional backbone"
        )
    dim, depth, heads = VIT_SIZES[name]
    return ViT(in_channels, image_size, patch_size, dim, depth, heads), dim
