"""The one decode path for every image file a user hands in: header first, then a decoder that
raises instead of crashing.

Why not `torchvision.io.decode_image` for everything: its libpng path kills the process
(SIGSEGV) on a PNG whose data ends before its header says, and it has no decompression-bomb
limit (a 389 KB PNG of 20000×20000 decodes to 6.9 GB). So the header is read first (PIL reads
only the header on open), its pixel count checked against `max_pixels()`, and then:

- JPEG goes through torchvision's libjpeg-turbo decoder (raises on damaged data; about 3x PIL's
  speed on large photos), or through PIL's DCT scaling (`draft`) when the caller will shrink the
  image at least twofold anyway (faster still, a fraction of the memory);
- everything else (PNG, WebP, BMP, ...) through PIL, which raises on truncated data.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from selfsup.core.errors import SelfsupError, first_line

if TYPE_CHECKING:  # torch loads on the first decode: the CLI reads max_pixels() without it
    import torch

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (about 89 MP)
MAX_PIXELS_ENV = "SELFSUP_MAX_PIXELS"


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
    from PIL import Image, UnidentifiedImageError

    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL's own check (it refuses past twice this) follows ours
    try:
        with warnings.catch_warnings():  # PIL warns past the limit; the check below refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt, (width, height) = im.format or "", im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            raise SelfsupError(f"{path}: no such file") from None
        raise SelfsupError(f"{path}: cannot decode image ({first_line(e)})") from None
    except Image.DecompressionBombError as e:
        raise SelfsupError(
            f"{path}: {first_line(e)} (--max-pixels N raises the limit of {limit:,})"
        ) from None
    if width * height > limit:
        raise SelfsupError(
            f"{path}: {width}×{height} is {width * height:,} pixels, over the limit of "
            f"{limit:,} (--max-pixels N raises it)"
        )
    return fmt, width, height


def decode_image(path: str | Path, min_side: int | None = None) -> torch.Tensor:
    """One image file -> uint8 3×H×W, EXIF orientation applied.

    `min_side`: the caller only needs the short side to be at least this many pixels (it will
    resize); a JPEG at least twice that size is then decoded at a reduced scale (an exact
    power-of-two DCT scaling, never below `min_side`).
    """
    fmt, width, height = image_header(path)
    if fmt == "JPEG":
        if min_side is not None and min(width, height) >= 2 * min_side:
            return _pil_decode(path, draft=min_side)
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        try:
            return tv_decode(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:  # variants libjpeg-turbo refuses (CMYK, damaged): PIL says why
            pass
    return _pil_decode(path)


def _pil_decode(path: str | Path, draft: int | None = None) -> torch.Tensor:
    from PIL import Image, ImageFile, ImageOps

    # truncated data must raise, whatever another library set process-wide
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            if draft is not None:
                # the scale keeps both sides at least `draft` (PIL picks scale >= requested size)
                w, h = im.size
                s = draft / min(w, h)
                im.draft("RGB", (max(draft, round(w * s)), max(draft, round(h * s))))
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SelfsupError(f"{path}: cannot decode image ({first_line(e)})") from None
    import torch

    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
