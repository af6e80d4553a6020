"""Datasets as uint8 image tensors: `--data` specs, batch loaders, shape adaptation."""

from selfsup.image.data.images import ImageData
from selfsup.image.data.loader import EpochSampler, batch_loader
from selfsup.image.data.sources import load_splits, stratified_indices
from selfsup.image.data.transforms import adapt_images

__all__ = [
    "EpochSampler",
    "ImageData",
    "adapt_images",
    "batch_loader",
    "load_splits",
    "stratified_indices",
]
