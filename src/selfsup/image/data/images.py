"""The in-memory (or lazy) image dataset every method and evaluation works on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

MAX_WORKERS = 8  # decoding workers by default, at most
PARALLEL_FROM = 256  # lazy images decoded at once from which workers pay for their start


def default_workers() -> int:
    """DataLoader workers for images decoded from disk: one per CPU core this process may use
    (shared between the processes of a multi-device run), at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_WORKERS, per_process))


def decode_all(lazy: Dataset, batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """Every item of a lazy image Dataset, in order, stacked into one uint8 tensor: decoded by
    `default_workers()` DataLoader workers when there are PARALLEL_FROM or more, with a bar on
    a terminal (`desc`)."""
    from tqdm.auto import tqdm

    n = len(lazy)  # type: ignore[arg-type]
    workers = default_workers() if n >= PARALLEL_FROM else 0
    loader = DataLoader(lazy, batch_size=batch_size, num_workers=workers)
    x: torch.Tensor | None = None
    done = 0
    with tqdm(total=n, desc=desc, unit="img", disable=None if desc else True) as bar:
        for batch, _ in loader:
            if x is None:
                x = torch.empty(n, *batch.shape[1:], dtype=batch.dtype)
            x[done : done + len(batch)] = batch
            done += len(batch)
            bar.update(len(batch))
    return x if x is not None else torch.empty(0, dtype=torch.uint8)


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
        return decode_all(torch.utils.data.Subset(self.lazy, indices.tolist()))  # type: ignore[arg-type]

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> ImageData:
        indices = torch.as_tensor(indices, dtype=torch.long)
        y = self.y[indices] if self.y is not None else None
        paths = [self.paths[i] for i in indices.tolist()] if self.paths is not None else None
        if self.x is not None:
            return ImageData(self.x[indices], y, self.classes, self.name, paths=paths)
        lazy = torch.utils.data.Subset(self.lazy, indices.tolist())  # type: ignore[arg-type]
        return ImageData(None, y, self.classes, self.name, lazy=lazy, paths=paths)
