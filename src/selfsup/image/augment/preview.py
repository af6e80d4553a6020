"""Figures of augmented views: the lecture's augmentation panel and a views grid for training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from selfsup.image import draw
from selfsup.image.augment.recipes import build_recipe
from selfsup.image.data.decode import decode_image
from selfsup.image.data.multichannel import displayable
from selfsup.image.data.transforms import unit_float

# (label, recipe) for each panel after the original, as in SimCLR's augmentation figure.
_PANELS = [
    ("Crop and resize", "crop"),
    ("Flip", "flip"),
    ("Color distort. (drop)", "color-drop"),
    ("Color distort. (jitter)", "color-jitter"),
    ("Rotate {90°, 180°, 270°}", None),
    ("Cutout", "cutout"),
    ("Gaussian noise", "noise"),
    ("Gaussian blur", "blur"),
    ("Sobel filtering", "sobel"),
]


def _load(image: Path, size: int) -> Tensor:
    """The image as float 1×3×size×size in [0, 1]: short side resized to size, centre-cropped."""
    x = decode_image(image, size)[None].float() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1)


def augment_preview(image: str | Path, out: str | Path, *, size: int = 224, seed: int = 0) -> Path:
    """Save a PNG grid of the image and each augmentation applied to it, labelled."""
    x = _load(Path(image), size)
    g = torch.Generator().manual_seed(seed)
    views = [("Original", x)]
    for label, recipe in _PANELS:
        if recipe is None:  # a visible rotation: never the 0° the rotation op may pick
            k = int(torch.randint(1, 4, (1,), generator=g))
            views.append((label, torch.rot90(x, k, dims=(2, 3))))
        else:
            views.append((label, build_recipe(recipe, (size, size), 3)(x, g)))
    fig = Figure(figsize=(2.2 * 5, 2.4 * 2))
    for ax, (label, v) in zip(fig.subplots(2, 5).flat, views, strict=True):
        draw.show(ax, v[0], label)
    return draw.save(fig, out)


def view_grid(x: Tensor, views: Sequence[Tensor], out: str | Path, *, n: int = 8) -> Path:
    """Save a PNG with one row per image (the first n of batch `x`, uint8 or float [0, 1]): the
    image, then its augmented views (`views`: float [0, 1] batches aligned with `x`). Images
    with other than 1 or 3 channels are drawn as `multichannel.displayable` false colour."""
    n = min(n, len(x))
    x = unit_float(x)
    columns = [("image", x[:n]), *((f"view {j}", v[:n]) for j, v in enumerate(views, 1))]
    columns = [(label, displayable(v)) for label, v in columns]
    return draw.image_columns(columns, out)
