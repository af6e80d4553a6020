"""Frozen-encoder feature extraction."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from selfsup.image.data.images import ImageData


def iter_images(data: ImageData, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches of `data` in order: slices when in memory, DataLoader workers when lazy."""
    if data.x is not None:
        for start in range(0, len(data), batch_size):
            yield data.x[start : start + batch_size]
    else:
        loader = DataLoader(data.lazy, batch_size=batch_size, num_workers=2)  # type: ignore[arg-type]
        for x, _ in loader:
            yield x


def extract_features(
    encoder: nn.Module,
    data: ImageData,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """`encoder(images)` for all of `data` as float32 N×D, in eval mode without gradients.

    The encoder is moved to `device`; its training mode is restored afterwards.
    """
    was_training = encoder.training
    encoder.eval().to(device)
    out: np.ndarray | None = None  # filled in place: the features exist once, never as chunks too
    batches = tqdm(
        iter_images(data, batch_size),
        total=math.ceil(len(data) / batch_size),
        desc=f"features {data.name}",
        disable=not progress,
        leave=False,
    )
    try:
        with torch.inference_mode():
            start = 0
            for x in batches:
                z = encoder(x.to(device)).float().flatten(1).cpu().numpy()
                if out is None:
                    out = np.empty((len(data), z.shape[1]), dtype=np.float32)
                out[start : start + len(z)] = z
                start += len(z)
    finally:
        encoder.train(was_training)
    if out is None:  # no images: no way to know the width but from the encoder
        return np.empty((0, getattr(encoder, "feature_dim", 0)), dtype=np.float32)
    return out


def embedding_problem(features: np.ndarray) -> str | None:
    """Why `features` (N×D) cannot be mapped (t-SNE, PCA) or clustered, or None when they can:
    fewer than 2 rows, NaN or infinite values, or every row the same up to its length (what an
    all-black dataset gives; scikit-learn's t-SNE crashes the process on it). Callers skip the
    picture or the clustering and show this reason instead."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2 or f.shape[1] == 0:
        return f"only {len(f)} embeddings of width {f.shape[-1] if f.ndim > 1 else 0}"
    bad = int((~np.isfinite(f)).any(axis=1).sum())
    if bad:
        return f"{bad} of {len(f)} embeddings hold NaN or infinite values (the encoder diverged?)"
    unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    spread = float(unit.std(axis=0).max())
    if spread < SAME_POINT:
        return (
            f"all {len(f)} embeddings are the same point (largest std {spread:.1g} after "
            "L2 normalisation): the encoder gives every image the same features (constant "
            "images, e.g. all black, or a collapsed encoder)"
        )
    return None


SAME_POINT = 1e-6  # below this spread of L2-normalised rows, float32 noise is all that differs
