"""Named augmentation pipelines built from the batched ops."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.core.errors import SelfsupError
from selfsup.image.augment import fused, ops

OPS: dict[str, Callable[..., Tensor]] = {
    "crop": ops.random_resized_crop,
    "flip": ops.horizontal_flip,
    "color-jitter": ops.color_jitter,
    "color-drop": ops.grayscale,
    "rotation": ops.rotation,
    "cutout": ops.cutout,
    "noise": ops.gaussian_noise,
    "blur": ops.gaussian_blur,
    "sobel": ops.sobel,
}

Step = tuple[str, dict[str, Any]]

# Ops that read the channels as R, G, B (luma, chroma): they apply to 3-channel images, and
# to gray ones as gray (jitter: brightness and contrast only; colour drop: the identity).
# Images with any other channel count (multispectral, RGBA) skip them; the geometric and
# per-pixel ops (crop, flip, rotation, cutout, noise, blur) apply to any channel count.
RGB_ONLY = ("color-jitter", "color-drop", "sobel")


def for_channels(steps: Sequence[Step], channels: int) -> list[Step]:
    """`steps` without the RGB_ONLY ops when `channels` is neither 1 nor 3, with one warning
    line naming those dropped and those kept."""
    if channels in (1, 3):
        return list(steps)
    kept = [s for s in steps if s[0] not in RGB_ONLY]
    dropped = [name for name, _ in steps if name in RGB_ONLY]
    if dropped:
        warnings.warn(
            f"augment: {', '.join(dropped)} skipped (they need RGB or gray images, these have "
            f"{channels} channels); applied: {', '.join(n for n, _ in kept) or 'nothing'}",
            stacklevel=3,
        )
    return kept


class Augment(nn.Module):
    """A pipeline of (op name, params) steps: `Augment([("crop", {"size": 32}), ("flip", {})])`.

    forward(x, g) takes uint8 (scaled by 1/255) or float [0, 1] B×C×H×W and returns float [0, 1].
    With `fuse`, a run crop [, flip] [, color-jitter] [, color-drop] runs as one fused op
    (`selfsup.image.augment.fused`: the same random parameters, colour clamped once at the end).
    `channels` (when given) drops the RGB_ONLY ops for images that are neither RGB nor gray.
    """

    def __init__(
        self, steps: Sequence[Step], fuse: bool = True, channels: int | None = None
    ) -> None:
        super().__init__()
        if channels is not None:
            steps = for_channels(steps, channels)
        unknown = [name for name, _ in steps if name not in OPS]
        if unknown:
            raise SelfsupError(f"unknown augment op {unknown[0]!r}; expected one of {list(OPS)}")
        self.steps = [(name, dict(params)) for name, params in steps]
        self.calls = fused.plan(self.steps, OPS) if fuse else [(OPS[n], p) for n, p in self.steps]

    def forward(self, x: Tensor, g: torch.Generator) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        for op, params in self.calls:
            x = op(x, g, **params)
        return x

    def extra_repr(self) -> str:
        return ", ".join(f"{name}{params or ''}" for name, params in self.steps)


def _simclr(size: tuple[int, int], channels: int) -> list[Step]:
    steps: list[Step] = [
        ("crop", {"size": size}),
        ("flip", {}),
        ("color-jitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}),
    ]
    if channels > 1:  # colour drop of a gray image is the identity
        steps.append(("color-drop", {"p": 0.2}))
    if min(size) >= 64:  # SimCLR skips blur on CIFAR-sized images
        steps.append(("blur", {"p": 0.5}))
    return steps


def _digits(size: tuple[int, int], channels: int) -> list[Step]:
    """For small gray digits and characters: no flips (they change a character's meaning) and
    milder crops than SimCLR's, so an 8x8 digit keeps its identity."""
    return [
        ("crop", {"size": size, "scale": (0.3, 1.0)}),
        ("color-jitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.0, "hue": 0.0}),
        ("noise", {"std": 0.1, "p": 0.5}),
    ]


def _single(name: str, **params: Any) -> Callable[[tuple[int, int], int], list[Step]]:
    return lambda size, channels: [(name, params)]


# name -> (image_size, channels) -> steps. Single-op recipes (for previews and ablations) apply
# their op to every sample (p=1).
RECIPES: dict[str, Callable[[tuple[int, int], int], list[Step]]] = {
    "simclr": _simclr,
    "digits": _digits,
    "light": lambda size, channels: [("crop", {"size": size, "scale": (0.5, 1.0)}), ("flip", {})],
    "none": lambda size, channels: [],
    "crop": lambda size, channels: [("crop", {"size": size})],
    "flip": _single("flip", p=1.0),
    "color-drop": _single("color-drop", p=1.0),
    "color-jitter": _single("color-jitter", p=1.0),
    "rotation": _single("rotation", p=1.0),
    "cutout": _single("cutout", p=1.0),
    "noise": _single("noise", p=1.0),
    "blur": _single("blur", p=1.0),
    "sobel": _single("sobel"),
}


def build_recipe(name: str, image_size: tuple[int, int], channels: int) -> Augment:
    """The named recipe for images of `image_size` (H, W) with `channels` channels (the
    RGB_ONLY ops skipped for channel counts other than 1 and 3)."""
    if name not in RECIPES:
        raise SelfsupError(f"unknown augmentation recipe {name!r}; expected one of {list(RECIPES)}")
    return Augment(RECIPES[name](tuple(image_size), channels), channels=channels)


# DINO's split of the crop scale between its views: global crops cover much of the image,
# local crops small parts of it (Caron et al. 2021: (0.4, 1) and (0.05, 0.4)).
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)


def multi_crop(
    name: str, image_size: tuple[int, int], local_size: int, channels: int
) -> tuple[Augment, Augment]:
    """Multi-crop (SwAV, DINO): the recipe's views as (global views at `image_size` from crops
    of GLOBAL_SCALE, local views at `local_size` from crops of LOCAL_SCALE). Everything but the
    crop is the recipe's own; a recipe without a crop gets one first."""
    if name not in RECIPES:
        raise SelfsupError(f"unknown augmentation recipe {name!r}; expected one of {list(RECIPES)}")

    def with_crop(size: tuple[int, int], scale: tuple[float, float]) -> Augment:
        steps = [s for s in RECIPES[name](size, channels) if s[0] != "crop"]
        return Augment([("crop", {"size": size, "scale": scale}), *steps], channels=channels)

    with warnings.catch_warnings():  # the same note for both crops: once
        views = with_crop(tuple(image_size), GLOBAL_SCALE)
        warnings.simplefilter("ignore")
        return views, with_crop((local_size,) * 2, LOCAL_SCALE)
