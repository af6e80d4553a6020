"""Batched, seedable image augmentations, named recipes and preview figures."""

from selfsup.image.augment.ops import (
    color_jitter,
    cutout,
    gaussian_blur,
    gaussian_noise,
    grayscale,
    horizontal_flip,
    random_resized_crop,
    rotation,
    sobel,
)
from selfsup.image.augment.preview import augment_preview, view_grid
from selfsup.image.augment.recipes import OPS, RECIPES, Augment, build_recipe

__all__ = [
    "OPS",
    "RECIPES",
    "Augment",
    "augment_preview",
    "build_recipe",
    "color_jitter",
    "cutout",
    "gaussian_blur",
    "gaussian_noise",
    "grayscale",
    "horizontal_flip",
    "random_resized_crop",
    "rotation",
    "sobel",
    "view_grid",
]
