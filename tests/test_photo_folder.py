"""Folders of photo-sized JPEG/PNG/WebP files (issue 31 item 3): JPEGs decoded at a reduced DCT
scale, uint8 squares from any size and format, the same batches with or without workers, and a
folder over the in-memory threshold never held in memory. Every image is made here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.image.data import batch_loader, load_splits, sources
from selfsup.image.data.decode import decode_image, decode_square
from selfsup.image.data.images import default_workers


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like RGB image (low-frequency waves and a little noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        128 + 90 * np.sin(2 * np.pi * (f * xx + g * yy) + p)
        for f, g, p in rng.uniform(0.5, 4, (3, 3))
    ]
    px = np.stack(channels, -1) + rng.normal(0, 3, (height, width, 3))
    return px.clip(0, 255).astype(np.uint8)


def _reference(path: Path, size: int) -> np.ndarray:
    """PIL's own: full decode, centre square, bilinear (antialiased) resize; H×W×3."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        return np.asarray(im.resize((size, size), Image.BILINEAR, box=box)).astype(np.int16)


def _close(x: torch.Tensor, reference: np.ndarray, mean: float, most: int) -> None:
    diff = np.abs(x.permute(1, 2, 0).numpy().astype(np.int16) - reference)
    assert diff.mean() < mean and diff.max() <= most, (diff.mean(), diff.max())


def test_draft_decoded_jpeg_matches_a_full_decode_and_resize(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_photo(800, 600)).save(path, quality=95)
    # the smallest DCT scale keeping a short side >= 96 is 1/4 (150 px); 1/8 would be 75
    assert tuple(decode_image(path, 96).shape) == (3, 150, 200)
    x = decode_square(path, 96)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 96, 96)
    _close(x, _reference(path, 96), mean=1.5, most=12)
    # a wrong crop (left-aligned instead of centred) is far outside that tolerance
    with Image.open(path) as im:
        left = np.asarray(im.convert("RGB").resize((96, 96), Image.BILINEAR, box=(0, 0, 600, 600)))
    assert np.abs(x.permute(1, 2, 0).numpy().astype(np.int16) - left).mean() > 5


def _mixed_folder(root: Path) -> list[Path]:
    """JPEG (large, grey, EXIF-rotated), PNG (RGBA, smaller than the target), WebP."""
    root.mkdir()
    files = []
    specs = [
        ("a.jpg", _photo(640, 480, 1), {}),
        ("b.png", _photo(50, 70, 2), {}),
        ("c.webp", _photo(300, 200, 3), {"lossless": True}),
        ("d.jpg", _photo(240, 400, 4)[..., 0], {"quality": 95}),
        ("e.png", np.dstack([_photo(90, 60, 5), np.full((60, 90), 200, np.uint8)]), {}),
    ]
    for name, px, kwargs in specs:
        Image.fromarray(px).save(root / name, **kwargs)
        files.append(root / name)
    return files


def test_loader_yields_uint8_squares_from_mixed_formats_and_sizes(tmp_path, monkeypatch) -> None:
    files = _mixed_folder(tmp_path / "mixed")
    eager, _ = load_splits(f"folder:{tmp_path / 'mixed'}", image_size=32)
    monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 0)
    lazy, _ = load_splits(f"folder:{tmp_path / 'mixed'}", image_size=32)
    assert eager.x is not None and lazy.x is None
    x, y = next(iter(batch_loader(lazy, 5, shuffle=False, drop_last=False)))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (5, 3, 32, 32) and y.tolist() == [-1] * 5
    assert torch.equal(x, eager.x)
    for image, path in zip(x, files, strict=True):
        _close(image, _reference(path, 32), mean=2.0, most=40)


def test_workers_give_the_same_batches_as_the_main_process(tmp_path, monkeypatch) -> None:
    for c in ("cat", "dog"):
        (tmp_path / "two" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(_photo(48 + 8 * i, 40, i)).save(tmp_path / "two" / c / f"{i}.jpg")
    monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 0)
    train, _ = load_splits(f"folder:{tmp_path / 'two'}", image_size=16)

    def epochs(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = batch_loader(train, 3, shuffle=True, drop_last=True, seed=5, num_workers=workers)
        out = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            out += list(loader)
        return out

    alone, pooled = epochs(0), epochs(2)
    assert len(alone) == len(pooled) == 2 * (len(train) // 3)
    for (xa, ya), (xb, yb) in zip(alone, pooled, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(alone[0][0], alone[len(alone) // 2][0])  # epochs differ in order
    assert batch_loader(train, 3, shuffle=False, drop_last=False, num_workers=None).num_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 8  # 12 usable cores, capped at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 3  # the cores shared by 4 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1000")  # many processes on few cores: one each
    assert default_workers() == 1


@pytest.mark.parametrize("over", [True, False])
def test_a_folder_over_the_threshold_is_read_from_disk_each_time(tmp_path, monkeypatch, over):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((10, 12, 3), 10 * i, np.uint8)).save(root / f"{i}.png")
    needed = 4 * 3 * 8 * 8  # the folder as uint8 squares of 8 px
    monkeypatch.setattr(sources, "IN_MEMORY_BYTES", needed if over else needed + 1)
    data, _ = load_splits(f"folder:{root}", image_size=8)
    assert (data.x is None) == over
    Image.fromarray(np.full((10, 12, 3), 250, np.uint8)).save(root / "2.png")  # changed on disk
    assert int(data.images([2])[0, 0, 0, 0]) == (250 if over else 20)
    if over:  # the dataset keeps the file list only: one bytes array, no tensors
        ds = data.lazy
        held = [v for v in vars(ds).values() if isinstance(v, torch.Tensor)]
        assert not held and ds.paths.nbytes <= 4 * max(len(str(p)) for p in root.iterdir())
