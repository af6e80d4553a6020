"""DINO (Caron et al., 2021): self-distillation with no labels. A student (encoder + head)
matches, at temperature 0.1, the softmax of a momentum (EMA) teacher over `--out-dim`
prototypes; the teacher's outputs are centred (a running mean, `--center-momentum`, moved once
per optimiser step) and
sharpened (`--teacher-temperature` 0.04), which together keep them from collapsing. The head is
an MLP to an L2-normalised bottleneck, then prototypes of unit norm. Teacher and centre are in
the checkpoint, so resume continues them. `--local-crops K` adds multi-crop: the two global
views come from large crops, K local views at `--local-size` from small ones, and only the
student sees the local views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.engine.distributed import gather_no_grad
from selfsup.image.augment.recipes import multi_crop
from selfsup.image.config import PretrainConfig
from selfsup.image.losses.noncontrastive import dino
from selfsup.image.methods.siamese import Momentum
from selfsup.image.models.vit import VIT_SIZES


@dataclass
class Options:
    """DINO's own options (the paper: 65,536 prototypes, a 2048-wide head, momentum 0.996)."""

    out_dim: int = option(1024, "number of prototypes the head scores", check=">=2")
    projection_hidden: int = option(512, "hidden size of the head's MLP", check=">=1")
    bottleneck: int = option(128, "size of the L2-normalised bottleneck", check=">=1")
    teacher_temperature: float = option(0.04, "the teacher's softmax temperature", check=">0")
    student_temperature: float = option(0.1, "the student's softmax temperature", check=">0")
    center_momentum: float = option(0.9, "momentum of the teacher's running centre", check="[0,1]")
    momentum: float = option(
        0.99, "the teacher's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )
    local_crops: int = option(
        0, "multi-crop: small local views per image beside the 2 global ones (DINO: 8)", check=">=0"
    )
    local_size: int | None = option(
        None, "multi-crop: side of the local views (default: half the image side)", check=">=4"
    )


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalised bottleneck -> unit-norm prototypes (weight norm, g = 1)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class DINO(Momentum):
    Options = Options
    momentum_targets = (("teacher_encoder", "encoder"), ("teacher_head", "head"))

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        super().__init__(config, data_info, options)
        o = self.options
        self.register_buffer("center", torch.zeros(o.out_dim))
        if o.local_crops:  # global views from large crops, local views from small ones
            if config.backbone in VIT_SIZES:
                raise SelfsupError(
                    f"--local-crops needs a convolutional backbone; {config.backbone}'s "
                    "position embeddings fix its input size"
                )
            size = tuple(data_info["dataset"]["image_size"])
            local = o.local_size or max(4, min(size) // 2)
            channels = data_info["dataset"]["channels"]
            self.views, self.local_views = multi_crop(self.config.recipe, size, local, channels)

    def build_heads(self) -> None:
        o = self.options
        self.head = DINOHead(self.encoder.feature_dim, o.projection_hidden, o.bottleneck, o.out_dim)
        self.pending: list[Tensor] = []  # --accumulate: this step's teacher outputs

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        views, features = self.two_views(x, g)
        student = list(self.head(features).chunk(2))
        if self.options.local_crops:  # the student alone sees the local views
            k = self.options.local_crops
            local = torch.cat([self.local_views(x, g) for _ in range(k)])
            student += list(self.head(self.encoder(local)).chunk(k))
        teacher = list(self.targets(views).chunk(2))
        o = self.options
        loss = dino(teacher, student, self.center, o.teacher_temperature, o.student_temperature)
        if self.training:  # with --accumulate once per optimiser step, over its whole batch
            self.pending.append(torch.cat(teacher))
            if self.config.accumulate == 1:
                self.flush_pending()
        return loss, features[: len(x)]

    def flush_pending(self) -> None:
        if self.pending:
            self.update_center(torch.cat(self.pending))
        self.pending.clear()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.flush_pending()

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """center <- m center + (1 - m) mean of the teacher's outputs (over every process)."""
        mean = gather_no_grad(teacher.float()).mean(dim=0)
        m = self.options.center_momentum
        self.center.mul_(m).add_(mean.to(self.center.dtype), alpha=1 - m)
