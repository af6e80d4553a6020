"""The one decode path for every image file a user hands in: header first, then a decoder that
raises instead of crashing.

Why not `torchvision.io.decode_image` for everything: its libpng path kills the process
(SIGSEGV) on a PNG whose data ends before its header says, and it has no decompression-bomb
limit (a 389 KB PNG of 20000×20000 decodes to 6.9 GB). So the header is read first (PIL reads
only the header on open), its pixel count checked against `max_pixels()`, and then:

- JPEG goes through torchvision's libjpeg-turbo decoder (raises on damaged data; 1.1-1.5x PIL's
  speed at full scale on this project's 2-core machine), or through PIL's DCT scaling (`draft`)
  when the caller will shrink the image at least twofold anyway (faster still, and a fraction
  of the memory: `benchmarks/photo_loader.py` measures both);
- everything else (PNG, WebP, BMP, ...) through PIL, which raises on truncated data.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from selfsup.core.errors import SelfsupError, first_line

if TYPE_CHECKING:  # torch loads on the first decode: the CLI reads max_pixels() without it
    import torch
    from PIL.Image import Image as PILImage

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (about 89 MP)
MAX_PIXELS_ENV = "SELFSUP_MAX_PIXELS"
_ORIENTATION = 0x0112  # the EXIF tag


class DeepPixels(SelfsupError):
    """An image of more than 8 bits a channel (16-bit or float), which the uint8 RGB decode
    would clip: such files go through `multichannel.read_image`."""


def max_pixels() -> int:
    """The largest image (width × height) decoded: $SELFSUP_MAX_PIXELS (set by `--max-pixels`,
    inherited by worker processes), else PIL's default of about 89 MP."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise SelfsupError(f"${MAX_PIXELS_ENV} must be a whole number, got {text!r}") from None
    if value < 1:
        raise SelfsupError(f"${MAX_PIXELS_ENV} must be at least 1, got {value}")
    return value


def set_max_pixels(value: int | None) -> None:
    """Set (None: reset) the pixel limit for this process and the processes it starts."""
    if value is None:
        os.environ.pop(MAX_PIXELS_ENV, None)
        return
    if value < 1:
        raise SelfsupError(f"--max-pixels must be at least 1, got {value}")
    os.environ[MAX_PIXELS_ENV] = str(value)


def image_header(path: str | Path) -> tuple[str, int, int]:
    """(format, width, height) from the file's header alone; one line if it is not an image or
    larger than `max_pixels()`."""
    with _checked_open(path) as im:
        return im.format or "", *im.size


def image_mode(path: str | Path) -> str:
    """PIL's mode of the file ("RGB", "L", "I;16", ...) from its header alone; one line as
    `image_header`."""
    with _checked_open(path) as im:
        return im.mode


@contextlib.contextmanager
def _checked_open(path: str | Path) -> Iterator[PILImage]:
    """The file opened by PIL (which reads the header only), its pixel count checked against
    `max_pixels()`; a damaged or unknown file, while opening or decoding, is one line."""
    from PIL import Image, UnidentifiedImageError

    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL's own check (it refuses past twice this) follows ours
    try:
        with warnings.catch_warnings():  # PIL warns past the limit; the check below refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > limit:
                    raise SelfsupError(
                        f"{path}: {width}×{height} is {width * height:,} pixels, over the limit "
                        f"of {limit:,} (--max-pixels N raises it)"
                    )
                yield im
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            raise SelfsupError(f"{path}: no such file") from None
        raise SelfsupError(f"{path}: cannot decode image ({first_line(e)})") from None
    except Image.DecompressionBombError as e:
        raise SelfsupError(
            f"{path}: {first_line(e)} (--max-pixels N raises the limit of {limit:,})"
        ) from None


def decode_image(path: str | Path, min_side: int | None = None) -> torch.Tensor:
    """One image file -> uint8 3×H×W, EXIF orientation applied.

    `min_side`: the caller only needs the short side to be at least this many pixels (it will
    resize); a JPEG at least twice that size is then decoded at a reduced scale (an exact
    power-of-two DCT scaling, the smallest whose short side is still >= `min_side`).
    """
    from PIL import ImageFile

    with _checked_open(path) as im:
        w, h = im.size
        draft = min_side is not None and min(w, h) >= 2 * min_side
        if im.format != "JPEG" or draft:
            # truncated data must raise, whatever another library set process-wide
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            if draft:  # PIL picks the largest reduction keeping both sides >= the size asked
                s = min_side / min(w, h)  # type: ignore[operator]
                im.draft("RGB", (max(min_side, round(w * s)), max(min_side, round(h * s))))
            return _pil_rgb(im, path)
    # full-scale JPEG: libjpeg-turbo through torchvision
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    try:
        return tv_decode(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # variants libjpeg-turbo refuses (CMYK, damaged): PIL says why
        pass
    with _checked_open(path) as im:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        return _pil_rgb(im, path)


def _pil_rgb(im: PILImage, path: str | Path) -> torch.Tensor:
    """An opened PIL image decoded to uint8 3×H×W, EXIF orientation applied (copies only where
    something changes)."""
    import torch
    from PIL import ImageOps

    if im.mode.startswith(("I", "F")):  # convert("RGB") would clip them to 255
        raise DeepPixels(f"{path}: {im.mode} pixels, more than 8 bits a channel")
    if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def decode_square(path: str | Path, size: int) -> torch.Tensor:
    """One image file -> uint8 3×size×size: the centre square of its short side, resized
    (bilinear, antialiased) on uint8, decoded at the smallest JPEG scale that keeps `size`."""
    return square_uint8(decode_image(path, size), size)


def square_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 C×H×W -> C×size×size: centre crop to a square, bilinear antialiased resize.

    torch's uint8 kernel (channels-last) is 4-8x faster than the float one of
    `transforms.square_resize` and within 1 of it (rounding)."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = x[None, :, top : top + side, left : left + side]
    if side == size:
        return square[0].contiguous()
    square = square.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True)
    return out[0].contiguous()
