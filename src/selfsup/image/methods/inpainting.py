"""Context encoder (Pathak et al., 2016): remove a region, paint it back from its context.

`--mask center` removes one centred square of side `--mask-size` (default half the image side,
as in the paper); `--mask random` removes `--mask-blocks` squares (default side a quarter of the
image) at random places. The removed pixels are set to the dataset mean; the encoder reads this
context, a decoder paints a whole image, and the loss is

    rec · L2 on the removed pixels (+ rec_outside · L2 elsewhere) + adv · adversarial

with a discriminator that tells real pixels from painted ones (the centre square itself with
`--mask center`, the whole composite image with `--mask random`). Defaults rec 0.999, adv 0.001
as in the paper; `--adv 0` trains by reconstruction alone and builds no discriminator.

Both players train from one optimizer in one backward pass (simultaneous gradient steps, so
Lightning's checkpoints, resume and schedule work as for every method): the generator's
adversarial term runs the discriminator with detached parameters, and the discriminator's loss
sees detached paintings, so neither loss moves the other player.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.image import draw
from selfsup.image.config import PretrainConfig
from selfsup.image.data.transforms import unit_float
from selfsup.image.methods.base import Method
from selfsup.image.models.decoders import ConvDecoder


@dataclass
class Options:
    """The context encoder's own options: the removed region and the loss weights."""

    mask: str = option("center", "region removed, center (one square) | random (blocks)")
    mask_size: int | None = option(
        None,
        "side of each removed square (default: center H/2, random H/4)",
        check=">=1",
    )
    mask_blocks: int = option(4, "squares removed per image with --mask random", check=">=1")
    rec: float = option(0.999, "weight of the L2 loss on the removed region")
    adv: float = option(0.001, "weight of the adversarial loss (0: L2 only)")
    rec_outside: float = option(0.0, "weight of the L2 loss outside the region, relative to inside")


MASKS = ("center", "random")


def mask_side(options: Options, image_size: tuple[int, int]) -> int:
    """The side of each removed square: --mask-size, or half (center) / a quarter (random) of
    the shorter image side."""
    if options.mask_size is not None:
        return options.mask_size
    return max(1, min(image_size) // (2 if options.mask == "center" else 4))


def center_mask(batch: int, image_size: tuple[int, int], side: int, device: Any = "cpu") -> Tensor:
    """B×1×H×W, 1 on the centred side×side square (the region removed), 0 elsewhere."""
    h, w = image_size
    mask = torch.zeros(batch, 1, h, w, device=device)
    top, left = (h - side) // 2, (w - side) // 2
    mask[..., top : top + side, left : left + side] = 1
    return mask


def random_block_mask(
    batch: int, image_size: tuple[int, int], side: int, blocks: int, g: torch.Generator
) -> Tensor:
    """B×1×H×W, 1 on `blocks` side×side squares per image at uniform positions (may overlap)."""
    h, w = image_size
    device = g.device
    tops = torch.randint(0, h - side + 1, (batch, blocks, 1, 1), generator=g, device=device)
    lefts = torch.randint(0, w - side + 1, (batch, blocks, 1, 1), generator=g, device=device)
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, 1, w)
    inside = (rows >= tops) & (rows < tops + side) & (cols >= lefts) & (cols < lefts + side)
    return inside.any(dim=1, keepdim=True).float()


def masked_l2(prediction: Tensor, target: Tensor, mask: Tensor, outside: float = 0.0) -> Tensor:
    """Mean squared error over the removed pixels (all channels), plus `outside` times the mean
    squared error over the kept ones."""
    squared = (prediction - target) ** 2
    mask = mask.expand_as(squared)
    loss = (squared * mask).sum() / mask.sum().clamp_min(1)
    if outside > 0:
        kept = 1 - mask
        loss = loss + outside * (squared * kept).sum() / kept.sum().clamp_min(1)
    return loss


class Discriminator(nn.Module):
    """Real or painted? Strided 3×3 convs with LeakyReLU (DCGAN style, no normalisation so that
    a functional call with detached parameters has no running statistics to update), global
    average pooling, one logit. Works for any input size."""

    def __init__(self, channels: int, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(depth):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.logit = nn.Linear(c_in, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.logit(self.features(x).mean(dim=(2, 3))).squeeze(1)


class Inpainting(Method):
    Options = Options
    default_recipe = None  # the removed region is the only corruption

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        options, dataset = self.options, data_info["dataset"]
        self.image_size: tuple[int, int] = tuple(dataset["image_size"])  # type: ignore[assignment]
        _check_options(options, self.image_size)
        self.side = mask_side(options, self.image_size)
        self.decoder = ConvDecoder(self.encoder.feature_dim, dataset["channels"], self.image_size)
        self.discriminator = Discriminator(dataset["channels"]) if options.adv > 0 else None

    def masks(self, batch: int, g: torch.Generator) -> Tensor:
        """B×1×H×W, 1 where pixels are removed."""
        if self.options.mask == "center":
            return center_mask(batch, self.image_size, self.side, g.device)
        return random_block_mask(batch, self.image_size, self.side, self.options.mask_blocks, g)

    def context(self, clean: Tensor, mask: Tensor) -> Tensor:
        """The encoder's input: removed pixels set to the dataset mean (0 after normalising)."""
        return torch.where(mask.bool(), self.encoder.mean.to(clean.dtype), clean)

    def paint(self, clean: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(decoded image B×C×H×W in [0, 1], encoder features of the context)."""
        features = self.encoder(self.context(clean, mask))
        return self.decoder(features), features

    def judged(self, images: Tensor) -> Tensor:
        """What the discriminator sees: the centre square (center) or the whole image."""
        if self.options.mask != "center":
            return images
        h, w = self.image_size
        top, left = (h - self.side) // 2, (w - self.side) // 2
        return images[..., top : top + self.side, left : left + self.side]

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        clean = unit_float(x)
        mask = self.masks(len(x), g)
        painted, features = self.paint(clean, mask)
        painted = painted.float()
        reconstruction = masked_l2(painted, clean, mask, self.options.rec_outside)
        self.log("train/rec_loss", reconstruction)
        loss = self.options.rec * reconstruction
        if self.discriminator is None:
            return loss, features
        composite = torch.where(mask.bool(), painted, clean)
        fake, real = self.judged(composite), self.judged(clean)
        # Generator: fool a discriminator whose parameters do not move with this term.
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fooled = functional_call(self.discriminator, frozen, (fake,))
        adversarial = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        # Discriminator: real -> 1, painted (detached: no gradient to the generator) -> 0.
        logits = self.discriminator(torch.cat([real, fake.detach()]))
        targets = torch.cat([torch.ones(len(x)), torch.zeros(len(x))]).to(logits)
        discriminator = F.binary_cross_entropy_with_logits(logits, targets)
        self.log("train/adv_loss", adversarial)
        self.log("train/disc_loss", discriminator)
        return loss + self.options.adv * adversarial + discriminator, features

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Rows: the context the encoder sees, the painted region pasted into it (titled L2 or
        L2 + adversarial after this run's --adv), and the ground truth."""
        inpaint_grid(self, x, path)


def inpaint_rows(method: Inpainting, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(context, composite, ground truth) float [0, 1] images for the sample grids; random masks
    come from a generator seeded with the run's seed, so every epoch shows the same holes."""
    g = torch.Generator(device=x.device).manual_seed(method.config.seed)
    clean = unit_float(x)
    mask = method.masks(len(x), g)
    with torch.no_grad():
        painted, _ = method.paint(clean, mask)
    composite = torch.where(mask.bool(), painted.float(), clean)
    return method.context(clean, mask), composite, clean


def inpaint_grid(method: Inpainting, x: Tensor, path: Path, *others: Inpainting) -> Path:
    """The lecture's figure: context, then each run's painting, then the ground truth. `others`
    are further inpainting runs (e.g. one with --adv 0) drawn on the same images and holes."""
    context, composite, truth = inpaint_rows(method, x)
    rows = [("context", context)]
    for m, painting in [(m, inpaint_rows(m, x)[1]) for m in others] + [(method, composite)]:
        label = f"L2 + adversarial ({m.options.adv:g})" if m.options.adv > 0 else "L2 only"
        rows.append((label, painting))
    rows.append(("ground truth", truth))
    return draw.image_rows(rows, path)


def _check_options(options: Options, image_size: tuple[int, int]) -> None:
    if options.mask not in MASKS:
        raise SelfsupError(
            f"--mask {options.mask!r} is unknown; expected one of {', '.join(MASKS)}"
        )
    side = mask_side(options, image_size)
    h, w = image_size
    if side < 1 or side >= min(h, w):
        raise SelfsupError(
            f"--mask-size {side} must be at least 1 and smaller than the {h}×{w} images "
            "(some context must remain)"
        )
    if options.mask == "random" and options.mask_blocks < 1:
        raise SelfsupError(f"--mask-blocks must be at least 1, got {options.mask_blocks}")
    for flag, value in [("--rec", options.rec), ("--adv", options.adv)]:
        if value < 0:
            raise SelfsupError(f"{flag} is a loss weight and must be >= 0, got {value}")
    if options.rec_outside < 0:
        raise SelfsupError(f"--rec-outside must be >= 0, got {options.rec_outside}")
