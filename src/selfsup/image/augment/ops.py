"""Batched augmentations with per-sample random parameters.

Every op takes a float batch B×C×H×W in [0, 1] and a `torch.Generator` on the batch's device and
returns a float batch in [0, 1]; all randomness is drawn from `g`, so a fixed seed gives identical
output. Ops are vectorised over the batch (no per-image Python loops) and run on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.image.data.transforms import LUMA

# ITU-R 601 luma, as torchvision's rgb_to_grayscale; also the Y row of YIQ.
_RGB_TO_YIQ = torch.tensor([LUMA, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def coin(x: Tensor, g: torch.Generator, p: float) -> Tensor:
    """Per-sample bool (B,): True with probability p."""
    return torch.rand(x.shape[0], generator=g, device=x.device) < p


def _uniform(x: Tensor, g: torch.Generator, low: float, high: float) -> Tensor:
    """Per-sample uniform values (B,) in [low, high)."""
    return torch.rand(x.shape[0], generator=g, device=x.device) * (high - low) + low


def gray(x: Tensor) -> Tensor:
    """Luminance B×1×H×W (the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


CROP_TRIES = 10  # torchvision's RandomResizedCrop draws this many boxes before its fallback


def crop_boxes(
    x: Tensor,
    g: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Random boxes B×4 (x0, y0, width, height) in pixels, drawn as torchvision's
    RandomResizedCrop.get_params draws them, batched: area fraction ~ U(scale) and log-uniform
    aspect ratio, re-drawn up to 10 times until the box, rounded to whole pixels, fits in the
    image (the first fitting draw is kept, unrounded but cut to the image), position uniform over
    the places it fits; a sample with no fitting draw gets the centre crop of the whole image
    with its aspect ratio clamped into `ratio`. Clamping an oversized box to the image instead,
    as this did before, biased the areas up: mean area fraction 0.53 against torchvision's 0.49
    on 32×32 images at the defaults, 0.35 against 0.20 on 10×40 ones.
    """
    b, _, h, w = x.shape
    fraction = torch.rand(b, CROP_TRIES, generator=g, device=x.device)
    area = (fraction * (scale[1] - scale[0]) + scale[0]) * (h * w)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    log_aspect = torch.rand(b, CROP_TRIES, generator=g, device=x.device) * (log_hi - log_lo)
    aspect = (log_aspect + log_lo).exp()
    tries_w, tries_h = (area * aspect).sqrt(), (area / aspect).sqrt()
    # torchvision's test, on the sizes rounded to whole pixels; a kept box is then cut to the
    # image (by less than half a pixel)
    rounded_w, rounded_h = tries_w.round(), tries_h.round()
    fits = (rounded_w >= 1) & (rounded_w <= w) & (rounded_h >= 1) & (rounded_h <= h)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting draw (0 if none fits)
    found = fits.any(dim=1)
    # torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio
    if w / h < min(ratio):
        fallback_w, fallback_h = float(w), w / min(ratio)
    elif w / h > max(ratio):
        fallback_w, fallback_h = h * max(ratio), float(h)
    else:
        fallback_w, fallback_h = float(w), float(h)
    bw = torch.where(found, tries_w.gather(1, first).squeeze(1).clamp(max=w), fallback_w)
    bh = torch.where(found, tries_h.gather(1, first).squeeze(1).clamp(max=h), fallback_h)
    x0 = torch.rand(b, generator=g, device=x.device) * (w - bw)
    y0 = torch.rand(b, generator=g, device=x.device) * (h - bh)
    x0 = torch.where(found, x0, (w - fallback_w) / 2)
    y0 = torch.where(found, y0, (h - fallback_h) / 2)
    return torch.stack([x0, y0, bw, bh], dim=1)


def resample_boxes(
    x: Tensor, boxes: Tensor, size: tuple[int, int], flip: Tensor | None = None
) -> Tensor:
    """Each sample's box (x0, y0, width, height) resized to `size` (bilinear, border padding),
    mirrored left-right where `flip` (B bool) is set: one grid_sample for crop, resize and flip.

    Output pixel (i, j) samples the input at (x0 + width·(j + ½)/W' - ½, y0 + height·(i + ½)/H'
    - ½) in pixel coordinates; a flip mirrors j. The axis-aligned grid is built by broadcasting
    (F.affine_grid's batched matrix product over every pixel measured several times slower).
    """
    b, _, h, w = x.shape
    oh, ow = size
    x0, y0, bw, bh = (t.to(x.dtype)[:, None] for t in boxes.unbind(1))
    j = (torch.arange(ow, device=x.device, dtype=x.dtype) + 0.5) / ow  # (j + ½) / W'
    i = (torch.arange(oh, device=x.device, dtype=x.dtype) + 0.5) / oh
    if flip is not None:
        j = torch.where(flip[:, None], 1 - j, j)
    # grid_sample's normalised coordinates (align_corners=False): u = (2·pixel + 1) / size - 1
    gx = (2 * (x0 + bw * j)) / w - 1  # B×W'
    gy = (2 * (y0 + bh * i)) / h - 1  # B×H'
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    # Measured against torchvision's roi_align (aligned=True) on 256×3×32×32 -> 32×32 on 2 CPU
    # cores: grid_sample ~3-5 ms, roi_align ~5.5 ms (sampling_ratio=1 or adaptive), ~20 ms with
    # sampling_ratio=2; both give the same values here (crops are upsampled, so roi_align's
    # extra samples buy no anti-aliasing).
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


def random_resized_crop(
    x: Tensor,
    g: torch.Generator,
    size: tuple[int, int] | int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Crop a random box per sample (`crop_boxes`) and resize it to `size` (bilinear)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return resample_boxes(x, crop_boxes(x, g, scale, ratio), size)


def horizontal_flip(x: Tensor, g: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror left-right each sample with probability p."""
    return torch.where(coin(x, g, p).view(-1, 1, 1, 1), x.flip(-1), x)


def jitter_params(
    x: Tensor,
    g: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`color_jitter`'s per-sample factors (brightness, contrast, saturation) and hue angle in
    radians, each (B,); the identity (1, 1, 1, 0) where the p-coin says no. Saturation and hue
    are drawn only for images with more than one channel."""
    on = coin(x, g, p)

    def factor(s: float) -> Tensor:
        return torch.where(on, _uniform(x, g, max(0.0, 1 - s), 1 + s), 1.0)

    b_, c_ = factor(brightness), factor(contrast)
    if x.shape[1] == 1:
        return b_, c_, torch.ones_like(b_), torch.zeros_like(b_)
    s_ = factor(saturation)
    angle = torch.where(on, _uniform(x, g, -hue, hue), 0.0) * (2 * math.pi)
    return b_, c_, s_, angle


def chroma_matrix(saturation: Tensor, angle: Tensor) -> Tensor:
    """B×3×3 RGB matrices that scale the chroma plane (I, Q) of YIQ by `saturation` and rotate
    it by `angle` (radians), keeping luma. Scaling alone is exactly torchvision's
    adjust_saturation (s·x + (1 - s)·luma); the rotation approximates torchvision's HSV hue
    shift by the same angle (same direction, mean |difference| about 0.085 at 0.1 turn on
    random colours; tests/test_fused_augment.py), but keeps luma exactly."""
    b = saturation.shape[0]
    cos, sin = saturation * angle.cos(), saturation * angle.sin()
    chroma = torch.zeros(b, 3, 3, device=saturation.device, dtype=saturation.dtype)
    chroma[:, 0, 0] = 1
    # turning I towards -Q moves hues the way torchvision's adjust_hue does for a positive shift
    chroma[:, 1, 1], chroma[:, 1, 2] = cos, sin
    chroma[:, 2, 1], chroma[:, 2, 2] = -sin, cos
    return _YIQ_TO_RGB.to(chroma) @ chroma @ _RGB_TO_YIQ.to(chroma)


def apply_jitter(x: Tensor, params: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Brightness, contrast, then saturation and hue with the given per-sample parameters;
    clamps to [0, 1] after each, as torchvision's functional ops do. Modifies x in place."""
    brightness, contrast, saturation, angle = (t.to(x.dtype) for t in params)
    x = x.mul_(brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
    mean = gray(x).mean((1, 2, 3), keepdim=True)
    x = x.sub_(mean).mul_(contrast.view(-1, 1, 1, 1)).add_(mean).clamp_(0, 1)
    if x.shape[1] == 1:
        return x
    b, c, h, w = x.shape
    m = chroma_matrix(saturation, angle)
    return torch.bmm(m, x.view(b, c, h * w)).view(b, c, h, w).clamp_(0, 1)


def color_jitter(x: Tensor, g: torch.Generator, *strengths: float, **named: float) -> Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter, applied with probability p:
    the strengths brightness, contrast, saturation, hue and p are `jitter_params`' (one set of
    defaults, SimCLR's 0.4, 0.4, 0.4, 0.1 and 0.8, for this op and the fused one).

    Fixed order (brightness, contrast, then saturation and hue together), unlike torchvision's
    random order. Factors are drawn from U(max(0, 1 - s), 1 + s) and the hue shift from
    U(-hue, hue) turns; saturation scales and hue rotates the chroma plane (I, Q) of YIQ, one
    3×3 matrix per sample. 1-channel images get brightness and contrast only.

    Brightness, contrast and saturation equal torchvision's adjust_* ops; hue does not: it is a
    YIQ rotation, not torchvision's HSV hue shift (it keeps luma exactly; on random colours the
    mean |difference| from torchvision's adjust_hue is 0.022 at 0.02 turn and 0.085, at most
    0.39, at 0.1 turn, SimCLR's widest).
    """
    return apply_jitter(x.clone(), jitter_params(x, g, *strengths, **named))


def grayscale(x: Tensor, g: torch.Generator, p: float = 0.2) -> Tensor:
    """Replace each sample by its luminance with probability p ("colour drop"); keeps C."""
    return torch.where(coin(x, g, p).view(-1, 1, 1, 1), gray(x).expand_as(x), x)


def rotation(x: Tensor, g: torch.Generator, p: float = 1.0) -> Tensor:
    """With probability p rotate each sample by a random multiple of 90° (0/90/180/270); for
    non-square images only by 0 or 180°."""
    square = x.shape[-1] == x.shape[-2]
    k = torch.randint(4, (x.shape[0],), generator=g, device=x.device)
    k = torch.where(coin(x, g, p), k if square else k // 2 * 2, 0)
    out = x.clone()
    for turns in (1, 2, 3):
        idx = (k == turns).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], turns, dims=(2, 3))
    return out


def cutout(x: Tensor, g: torch.Generator, size_frac: float = 0.5, p: float = 0.5) -> Tensor:
    """With probability p set a square of side round(size_frac * min(H, W)) to zero (black)
    at a random centre pixel; the square is clipped at the border, as in DeVries & Taylor."""
    b, _, h, w = x.shape
    side = max(1, round(size_frac * min(h, w)))
    top = torch.randint(h, (b, 1), generator=g, device=x.device) - side // 2
    left = torch.randint(w, (b, 1), generator=g, device=x.device) - side // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + side)  # B×H
    in_cols = (cols >= left) & (cols < left + side)  # B×W
    mask = in_rows[:, :, None] & in_cols[:, None, :] & coin(x, g, p)[:, None, None]
    return x.masked_fill(mask[:, None], 0.0)


def gaussian_noise(x: Tensor, g: torch.Generator, std: float = 0.1, p: float = 0.5) -> Tensor:
    """With probability p add N(0, std²) pixel noise; clamped to [0, 1]."""
    noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    scale = torch.where(coin(x, g, p), std, 0.0).view(-1, 1, 1, 1)
    return (x + noise * scale).clamp_(0, 1)


def gaussian_blur(
    x: Tensor,
    g: torch.Generator,
    sigma: tuple[float, float] = (0.1, 2.0),
    p: float = 0.5,
    kernel_frac: float = 0.1,
) -> Tensor:
    """With probability p blur each sample with a Gaussian of sigma ~ U(sigma) (in pixels).

    Kernel side: kernel_frac of the shorter image side, odd, at least 3 (SimCLR uses 10%).
    Separable: one grouped conv per axis with a kernel per sample, reflect padding.
    """
    b, c, h, w = x.shape
    k = max(3, int(kernel_frac * min(h, w)) // 2 * 2 + 1)
    s = _uniform(x, g, *sigma).clamp_min(1e-3)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(t**2) / (2 * s[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype)
    kern = torch.where(coin(x, g, p)[:, None], kern, delta).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, b * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c)
    y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)
    return y.view(b, c, h, w).clamp_(0, 1)


def sobel(x: Tensor, g: torch.Generator | None = None) -> Tensor:
    """Sobel gradient magnitude of the luminance, divided by each image's maximum (a constant
    image gives 0) and repeated to C channels. Deterministic; `g` is accepted for uniformity."""
    luma = F.pad(gray(x), (1, 1, 1, 1), mode="replicate")
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    grad = F.conv2d(luma, torch.stack([kx, kx.T])[:, None])
    mag = grad.pow(2).sum(1, keepdim=True).sqrt()
    mag = mag / mag.amax((2, 3), keepdim=True).clamp_min(1e-6)
    return mag.expand_as(x).contiguous()
