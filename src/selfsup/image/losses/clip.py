"""CLIP's loss: symmetric InfoNCE between paired image and text embeddings, learnable temperature.

Pair i (image i, caption i) is the positive; every other caption of the batch is a negative for
image i and every other image for caption i. Under DDP each process's anchors are contrasted with
the embeddings of all processes (`selfsup.engine.distributed.gather_with_grad`), as in open_clip's
`local_loss` + `gather_with_grad`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.engine.distributed import gather_with_grad, is_distributed, unique_ids

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = math.log(100)  # the scale never exceeds 100 (temperature 0.01)


def clip_loss(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, gather: bool | None = None
) -> Tensor:
    """(CE(s·I·Tᵀ, pairs) + CE(s·T·Iᵀ, pairs)) / 2 for B×D image and text embeddings.

    `image` and `text` are L2-normalised here; `logit_scale` s multiplies the cosine
    similarities (s = 1/temperature, not its log). `gather` (default: on in a process group of
    more than one process) contrasts this process's B pairs with the 2·W·B embeddings of all
    processes; every process then holds B anchors, so the mean of the processes' losses is the
    loss on the whole batch, and with `gather_with_grad` summing gradients over processes, DDP's
    average of parameter gradients is that loss's gradient.
    """
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(
            f"expected image and text embeddings of equal shape B×D, "
            f"got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    gather = is_distributed() if gather is None else gather
    with torch.autocast(image.device.type, enabled=False):  # low-precision logits lose too much
        image, text = (F.normalize(_at_least_float32(t), dim=1) for t in (image, text))
        all_image = gather_with_grad(image) if gather else image
        all_text = gather_with_grad(text) if gather else text
        # row i of this process is pair rank·B + i of the whole batch
        n = len(image)
        targets = unique_ids(n, image.device) if gather else torch.arange(n, device=image.device)
        per_image = logit_scale * image @ all_text.T
        per_text = logit_scale * text @ all_image.T
        return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class LogitScale(nn.Module):
    """CLIP's learnable logit scale, stored as its log: init ln(1/0.07), capped at ln 100.

    forward() returns exp(log) unclamped, so the log-scale always receives its gradient, also at
    the cap (a clamp in forward would give it none there: once at ln 100 it could never come back
    down). Call `clamp_()` after each optimizer step to keep the stored value in [0, ln 100], as
    open_clip does (`logit_scale.clamp_(0, math.log(100))` after `optimizer.step()`).
    """

    def __init__(self, init: float = INIT_LOGIT_SCALE, max_log: float = MAX_LOGIT_SCALE) -> None:
        super().__init__()
        self.max_log = max_log
        self.log_scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self) -> Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored log-scale to [0, max_log] in place (after the optimizer step)."""
        self.log_scale.clamp_(0, self.max_log)


class CLIPLoss(nn.Module):
    """`clip_loss` with its own learnable `LogitScale`: forward(image, text).

    Call `self.logit_scale.clamp_()` after each optimizer step (see `LogitScale`).
    """

    def __init__(self, init: float = INIT_LOGIT_SCALE, max_log: float = MAX_LOGIT_SCALE) -> None:
        super().__init__()
        self.logit_scale = LogitScale(init, max_log)

    def forward(self, image: Tensor, text: Tensor, gather: bool | None = None) -> Tensor:
        return clip_loss(image, text, self.logit_scale(), gather)
