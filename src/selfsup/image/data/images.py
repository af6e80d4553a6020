"""The in-memory (or lazy) image dataset every method and evaluation works on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class ImageData:
    """Images as uint8 N×C×H×W, optional int64 labels (-1 = unlabeled), optional class names.

    `x` holds the images when they fit in memory; otherwise `x` is None and `lazy` is a Dataset
    whose item i is `(uint8 C×H×W, int label)`, decoded on demand (in DataLoader workers).
    """

    x: torch.Tensor | None
    y: torch.Tensor | None
    classes: list[str] | None
    name: str
    lazy: Dataset | None = None
    held_out: bool = False  # a test split carved out of a source that has none (see load_splits)
    paths: list[str] | None = None  # image i's file, for sources that are files (folders)

    def __post_init__(self) -> None:
        if (self.x is None) == (self.lazy is None):
            raise ValueError("ImageData needs exactly one of x (in memory) or lazy (a Dataset)")

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else len(self.lazy)  # type: ignore[arg-type]

    @property
    def _first(self) -> torch.Tensor:
        return self.x[0] if self.x is not None else self.lazy[0][0]  # type: ignore[index]

    @property
    def channels(self) -> int:
        return int(self._first.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self._first.shape[1:]
        return int(h), int(w)

    @property
    def has_labels(self) -> bool:
        return self.y is not None and bool((self.y >= 0).any())

    def images(self, indices: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """The uint8 images at `indices`, stacked into one batch."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if self.x is not None:
            return self.x[indices]
        return torch.stack([self.lazy[int(i)][0] for i in indices])  # type: ignore[index]

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> ImageData:
        indices = torch.as_tensor(indices, dtype=torch.long)
        y = self.y[indices] if self.y is not None else None
        paths = [self.paths[i] for i in indices.tolist()] if self.paths is not None else None
        if self.x is not None:
            return ImageData(self.x[indices], y, self.classes, self.name, paths=paths)
        lazy = torch.utils.data.Subset(self.lazy, indices.tolist())  # type: ignore[arg-type]
        return ImageData(None, y, self.classes, self.name, lazy=lazy, paths=paths)
