"""Images beyond RGB bytes: any channel count (multispectral, RGBA), 16-bit and float pixels.

Representation: uint8 pixels stay uint8 (the fast path, RGB or not). Every other pixel type
becomes float32 in [0, 1] when it is read:

- integers are scaled by their dtype's range, (x - min) / (max - min): uint16 / 65535 (as
  torchvision's `to_dtype(..., scale=True)`), int16 + 32768 over 65535. The scale depends on the
  dtype alone, not on the data: it is exact and invertible, the same for the train and test
  files and for whoever feeds the exported encoder later (raw / 65535), and nothing is clipped.
  Data that uses only part of the range (12-bit CT, Sentinel-2 reflectance up to ~10,000) gets
  small values; the encoder's per-channel mean/std, computed from the training images
  (`channel_stats`), standardise them, so the network sees unit-scale inputs either way.
- floats must already lie in [0, 1] (checked, one line otherwise): a float file carries no
  range, and a data-dependent rescaling (percentiles, min/max) would be invisible to the
  exported encoder's users; scale the array first.

Float32 costs 4 bytes a value in memory (uint16: 2) for exact 16-bit precision (float16 keeps
only 11 bits).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsup.core.errors import SelfsupError, first_line
from selfsup.image.data.decode import image_mode
from selfsup.image.data.transforms import square_resize, unit_float

STD_FLOOR = 1e-3  # a constant channel is divided by this, not by 0


def check_dtype(dtype: np.dtype, where: str) -> None:
    """One line unless `dtype` is a pixel type selfsup reads (integers, floats)."""
    if dtype.kind not in "uif":
        raise SelfsupError(
            f"{where}: pixels of dtype {dtype}; expected integers (uint8, uint16, ...) or floats"
        )


def pixel_scale(dtype: np.dtype) -> tuple[float, float]:
    """(offset, scale) mapping pixels of `dtype` to the encoder's [0, 1]: (raw - offset) / scale.
    uint8 (0, 255), other integers (their minimum, their range), floats (0, 1)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max) - float(info.min)
    return 0.0, 1.0


def to_unit(array: np.ndarray, where: str) -> torch.Tensor:
    """Pixels as a tensor of the same shape: uint8 as they are, other integers scaled to float32
    [0, 1] by their dtype's range (`pixel_scale`), floats as float32 (checked to lie in [0, 1])."""
    check_dtype(array.dtype, where)
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype.kind in "iu":
        offset, scale = pixel_scale(array.dtype)
        out = array.astype(np.float32)
        if offset:
            out -= np.float32(offset)
        return torch.from_numpy(out / np.float32(scale))
    out = array.astype(np.float32, copy=False)
    if out.size and not np.isfinite(out).all():
        raise SelfsupError(f"{where}: float pixels include NaN or infinity")
    if out.size and (out.min() < 0 or out.max() > 1):
        raise SelfsupError(
            f"{where}: float pixels range over [{out.min():.4g}, {out.max():.4g}], expected "
            "[0, 1]; scale them first (e.g. x / x.max() per channel) or store integers"
        )
    return torch.from_numpy(np.ascontiguousarray(out))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of images B×C×H×W (uint8, or float [0, 1]) on the [0, 1] scale
    the encoder normalises on; std floored at STD_FLOOR."""
    x = unit_float(images)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(STD_FLOOR).tolist()
    return mean, std


def displayable(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] B×C×H×W as something to draw: 1 or 3 channels as they are; otherwise the
    first three channels (the first one when C is 2) as false colour, each stretched to [0, 1]
    by its range in the batch (16-bit data often uses a small part of [0, 1])."""
    c = x.shape[1]
    if c in (1, 3):
        return x
    x = x[:, :3] if c > 3 else x[:, :1]
    low = x.amin(dim=(0, 2, 3), keepdim=True)
    high = x.amax(dim=(0, 2, 3), keepdim=True)
    return ((x - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)


# ---- image files: 16-bit PNG, multi-page / multichannel TIFF --------------------------------


def read_image(path: str | Path, keep_alpha: bool = False) -> np.ndarray:
    """One image file -> H×W×C in its own pixel type (uint8, uint16, int32, float32), via PIL.

    16-bit PNG (gray, mode I;16) reads as uint16; a TIFF's pages are its channels, stacked in
    order (each page one band: gray 8/16-bit, int32 or float32; an RGB(A) page adds its three
    (four) channels). Alpha is dropped unless `keep_alpha`. PIL reads 16-bit PNGs with one
    channel only (a 16-bit RGB PNG comes back as 8 bits); multi-band TIFFs with more than four
    samples per page need tifffile, which this does not use.
    """
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            pages = [_page(page, keep_alpha) for page in ImageSequence.Iterator(img)]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SelfsupError(f"{path}: not a readable image ({first_line(e)})") from None
    shapes = {p.shape[:2] for p in pages}
    if len(shapes) > 1:
        raise SelfsupError(f"{path}: its pages differ in size ({sorted(shapes)})")
    dtypes = {p.dtype for p in pages}
    if len(dtypes) > 1:
        raise SelfsupError(f"{path}: its pages differ in pixel type ({sorted(map(str, dtypes))})")
    return np.concatenate(pages, axis=2)


def _page(page, keep_alpha: bool) -> np.ndarray:
    mode = page.mode
    if mode in ("RGBA", "LA") and not keep_alpha:
        page = page.convert(mode[:-1])
    elif mode in ("P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        page = page.convert("RGBA" if keep_alpha and "transparency" in page.info else "RGB")
    array = np.asarray(page)
    if array.dtype.byteorder == ">":  # I;16B and big-endian TIFFs
        array = array.astype(array.dtype.newbyteorder("="))
    return array[..., None] if array.ndim == 2 else array


class StackImages(Dataset):
    """Image files read by `read_image` on demand (folders of 16-bit PNGs and TIFF stacks):
    item i -> (C×size×size, uint8 or float32 [0, 1] as `to_unit` gives, int label).

    Every file must have the channels and pixel type of the first one (read when this is made);
    one that differs is one line naming it when it is read. The paths are one bytes array, as
    `sources.FolderImages` holds them (forked workers copy no pages)."""

    def __init__(
        self, paths: Sequence[str], labels: Sequence[int], size: int, keep_alpha: bool = False
    ) -> None:
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size, self.keep_alpha = size, keep_alpha
        first = read_image(paths[0], keep_alpha)
        self.channels, self.dtype = first.shape[2], first.dtype

    @property
    def itemsize(self) -> int:
        """Bytes per value of the images this gives: 1 (uint8) or 4 (float32)."""
        return 1 if self.dtype == np.uint8 else 4

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = os.fsdecode(self.paths[i])
        array = read_image(path, self.keep_alpha)
        if (array.shape[2], array.dtype) != (self.channels, self.dtype):
            first = os.fsdecode(self.paths[0])
            raise SelfsupError(
                f"{path}: {array.shape[2]} channel(s) of {array.dtype} pixels, but {first} has "
                f"{self.channels} of {self.dtype}; a folder's images must all be alike"
            )
        pixels = to_unit(array, path)
        return square_resize(pixels.permute(2, 0, 1), self.size), int(self.labels[i])


def file_dtype(path: str | Path) -> np.dtype:
    """The pixel type a file reads as before scaling: a stack's own (`read_image`), else uint8."""
    return read_image(path).dtype if is_stack(path) else np.dtype(np.uint8)


def is_stack(path: str | Path) -> bool:
    """Whether a file needs `read_image` rather than the RGB decoder: a TIFF, or a PNG of
    16-bit pixels (from its header alone; a damaged file is one line)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".tif", ".tiff"):
        return True
    return suffix == ".png" and image_mode(path).startswith("I")
