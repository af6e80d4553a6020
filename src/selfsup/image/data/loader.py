"""DataLoaders over ImageData: batched indexing for in-memory data, workers for lazy data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from selfsup.core.errors import SelfsupError
from selfsup.image.data.images import ImageData, default_workers


class EpochSampler(Sampler[int]):
    """A random permutation per epoch, drawn from a generator seeded with `seed + epoch`.

    Lightning calls `set_epoch` at the start of every epoch, so a resumed run sees the same order.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _TensorImages(Dataset):
    """In-memory images whose `__getitems__` builds a whole batch with one indexing op."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


class _LazyImages(Dataset):
    """Lazy images with the labels taken from `ImageData.y` (so relabelled copies are honoured)."""

    def __init__(self, lazy: Dataset, y: torch.Tensor) -> None:
        self.lazy, self.y = lazy, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.lazy[i][0], int(self.y[i])


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def batch_loader(
    data: ImageData,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    num_workers: int | None = 0,
) -> DataLoader:
    """Batches `(x uint8 B×C×H×W, y int64 B)`, y = -1 where unlabeled.

    `shuffle` uses an `EpochSampler` (reseeded with seed + epoch by `set_epoch`; the order is
    drawn in the main process, so it is the same with any number of workers). `num_workers`
    applies to lazy data only (in-memory batches are a single indexing op); None: one per CPU
    core, at most 8 (`default_workers`). Lazy batches stay uint8 until the device, pinned when
    CUDA is there.
    """
    n = len(data)
    if batch_size < 1:
        raise SelfsupError(f"--batch-size must be at least 1, got {batch_size}")
    if drop_last and n < batch_size:
        raise SelfsupError(
            f"{data.name}: the dataset has {n} samples, fewer than batch size {batch_size}; "
            "lower --batch-size"
        )
    if shuffle and hasattr(data.lazy, "streaming_loader"):  # litdata shards: see shards.py
        workers = default_workers() if num_workers is None else num_workers
        return data.lazy.streaming_loader(batch_size, drop_last, seed, workers)  # type: ignore
    y = data.y if data.y is not None else torch.full((n,), -1, dtype=torch.long)
    sampler = EpochSampler(n, seed) if shuffle else None
    if data.x is not None:
        ds = _TensorImages(data.x, y)
        return DataLoader(
            ds, batch_size, sampler=sampler, drop_last=drop_last, collate_fn=_whole_batch
        )
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(
        _LazyImages(data.lazy, y),  # type: ignore[arg-type]
        batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
