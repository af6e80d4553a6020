"""Shape changes on image batches: channels (gray <-> RGB) and spatial size.

Batches are uint8 (the fast path: RGB and gray bytes) or float32 in [0, 1] (16-bit and float
pixels, any channel count: `selfsup.image.data.multichannel`); each function keeps the dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.core.errors import SelfsupError

LUMA = (0.299, 0.587, 0.114)
_CHUNK = 1024  # images converted at a time, to bound the float working memory


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1]: uint8 divided by 255, float images (already in [0, 1]) as
    they are."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _adapt_chunk(x: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    xf = x.float()
    if xf.shape[1] == 3 and channels == 1:
        xf = (xf * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(xf.shape[-2:]) != tuple(size):
        xf = F.interpolate(xf, size=size, mode="bilinear", antialias=True, align_corners=False)
    uint8 = x.dtype == torch.uint8
    out = xf.round().clamp(0, 255).to(torch.uint8) if uint8 else xf.clamp(0, 1)
    return out.repeat(1, channels, 1, 1) if out.shape[1] == 1 and channels == 3 else out


def adapt_images(x: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (or float [0, 1]) N×C×H×W -> the same dtype N×`channels`×`size`.

    RGB -> gray uses luminance weights 0.299/0.587/0.114, gray -> RGB repeats the channel; any
    other channel count can only be resized (C -> C): another change (6 -> 3, 3 -> 6) is one
    line. The resize is bilinear with antialiasing. Returns `x` itself when nothing changes.
    """
    if x.ndim != 4:
        raise ValueError(f"expected N×C×H×W images, got shape {tuple(x.shape)}")
    if x.shape[1] != channels and (x.shape[1] not in (1, 3) or channels not in (1, 3)):
        raise SelfsupError(
            f"images of {x.shape[1]} channel(s) cannot feed an encoder of {channels}: only grey "
            f"and RGB convert (1 <-> 3); use data with {channels} channel(s)"
        )
    size = (int(size[0]), int(size[1]))
    if x.shape[1] == channels and tuple(x.shape[-2:]) == size:
        return x
    return torch.cat([_adapt_chunk(c, channels, size) for c in x.split(_CHUNK)])


def square_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N×)C×H×W -> (N×)C×size×size: centre crop to a square, then resize (the same as a
    short-side resize followed by a centre crop)."""
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = x[..., top : top + side, left : left + side]
    batch = square if square.ndim == 4 else square[None]
    out = adapt_images(batch, batch.shape[1], (size, size))
    return out if x.ndim == 4 else out[0]
