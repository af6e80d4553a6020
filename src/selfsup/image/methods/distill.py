"""Distillation from a frozen pretrained teacher (lightly-train's default method): a student of
any backbone, through a small projector (`--projection-layers`, 1: linear as lightly-train's),
learns to give the teacher's features of one augmented view of every image. The teacher sees the
same view in its own resolution and normalisation (image/models/teacher.py), once per batch
under `no_grad`; "A good teacher is patient and consistent" (Beyer et al. 2022): both see the
identical, strongly augmented view. Where student and teacher are both ViTs (the student
selfsup's own `vit-*`), the student's patch tokens, projected and resized to the teacher's patch
grid, also match the teacher's (`--patch-weight`).

`--loss` (default `cosine`): 1 - cosine between the projected student feature and the teacher's,
i.e. the MSE of both L2-normalised, halved. Why: lightly-train v2 uses plain MSE on raw DINOv2
features, whose scale the LayerNorm fixes; our teachers are any run, timm, torchvision or Hugging
Face model, whose features' scale is arbitrary (a ResNet's pooled ReLU outputs, a ViT's
normalised tokens), and a raw MSE then weighs dimensions by their size and sets the learning
rate's meaning per teacher. The cosine keeps lightly-train's target (the teacher's own feature
direction, per image) without the scale. `mse` is lightly-train v2's raw MSE; `kl` is
lightly-train v1's: student and teacher features, L2-normalised, scored against the batch's
teacher features (the pseudo-classifier; v1 keeps a queue of earlier batches) at `--temperature`,
KL(teacher || student). DINOv2's own distillation (a frozen large ViT as the teacher of its
DINO + iBOT losses) needs the teacher's prototype heads, which a backbone from a library or
another method does not have, so it is not offered.

The teacher is rebuilt from `--teacher` (and `--teacher-weights` / `--teacher-pretrained`)
whenever the method is built, --resume included: it is held outside the module tree, so it is
in no checkpoint, no optimiser and no exported encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.image.config import PretrainConfig
from selfsup.image.data import ImageData
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead
from selfsup.image.models.teacher import Teacher, build_teacher
from selfsup.image.models.vit import VIT_SIZES, ViT, check_patch_size

LOSSES = ("cosine", "mse", "kl")


@dataclass
class Options:
    """Distillation's own options."""

    teacher: str = option(
        "",
        "the frozen teacher: a selfsup run folder, timm:NAME or torchvision:NAME (with "
        "--teacher-weights or --teacher-pretrained), or a Hugging Face vision model folder",
        required=True,
    )
    teacher_weights: str | None = option(
        None, "a timm/torchvision teacher's weights (safetensors or a weights-only torch file)"
    )
    teacher_pretrained: bool = option(
        False, "a timm/torchvision teacher with its library's published weights (downloads)"
    )
    teacher_image_size: int | None = option(
        None, "side the teacher sees (default: its own; a run's: its images')", check=">=4"
    )
    loss: str = option("cosine", "cosine, mse (lightly-train v2) or kl (lightly-train v1)")
    temperature: float = option(0.07, "kl: softmax temperature of the similarities", check=">0")
    projection_layers: int = option(
        1, "layers of the student's projector (1: linear, as lightly-train)", check=">=1"
    )
    projection_hidden: int = option(1024, "hidden size of a projector of 2+ layers", check=">=1")
    patch_weight: float = option(
        1.0, "weight of the patch-token term (student and teacher both ViTs)", check=">=0"
    )
    patch_size: int = option(4, "a vit-* student's patch side in pixels", check=">=1")


def distill_loss(student: Tensor, teacher: Tensor, kind: str, temperature: float) -> Tensor:
    """The mean distillation loss of student rows against teacher rows, N×D features or B×N×D
    patch tokens. cosine: 1 - cos; mse: mean squared difference; kl: both L2-normalised, scored
    against the normalised teacher rows (the batch's features; an image's own tokens) at
    `temperature`, KL(teacher || student) per row."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    bank = F.normalize(t, dim=-1)
    target = F.softmax(bank @ bank.mT / temperature, dim=-1)
    log_p = F.log_softmax(F.normalize(s, dim=-1) @ bank.mT / temperature, dim=-1)
    return F.kl_div(log_p, target, reduction="none").sum(dim=-1).mean()


class Distill(Method):
    Options = Options

    @classmethod
    def encoder_spec(cls, config: PretrainConfig, options: Any, data: ImageData) -> dict[str, Any]:
        """A vit-* student is built for the images' size and `--patch-size`."""
        if config.backbone not in VIT_SIZES:
            return {}
        check_patch_size(data.image_size, options.patch_size)
        return {"image_size": list(data.image_size), "patch_size": options.patch_size}

    def build_heads(self) -> None:
        o = self.options
        if o.loss not in LOSSES:
            raise SelfsupError(f"--loss {o.loss!r} is unknown; expected one of {', '.join(LOSSES)}")
        teacher = build_teacher(
            o.teacher,
            weights=o.teacher_weights,
            pretrained=o.teacher_pretrained,
            image_size=o.teacher_image_size,
        )
        dataset = self.data_info["dataset"]
        teacher.prepare(torch.zeros(1, dataset["channels"], 4, 4))  # channels: one line
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never saved or trained
        self.projection = ProjectionHead(
            self.encoder.feature_dim, o.projection_hidden, teacher.width, o.projection_layers
        )
        student = self.encoder.backbone
        probe = teacher.encode(torch.zeros(1, dataset["channels"], *teacher.size))
        if isinstance(student, ViT) and probe.patch_tokens is not None and o.patch_weight > 0:
            width = probe.patch_tokens.shape[-1]
            self.patch_projection = torch.nn.Linear(student.dim, width)

    @property
    def distills_patches(self) -> bool:
        return hasattr(self, "patch_projection")

    def teacher_outputs(self, views: Tensor) -> tuple[Tensor, Tensor | None]:
        """The frozen teacher's (features, patch tokens or None) of `views`, no gradient."""
        teacher: Teacher = self.teacher  # type: ignore[assignment]
        teacher.to(views.device)
        out = teacher.encode(views)
        return out.features.float(), out.patch_tokens

    def student_outputs(self, views: Tensor) -> tuple[Tensor, Tensor | None]:
        """(encoder features, patch tokens where they are distilled, else None)."""
        if not self.distills_patches:
            return self.encoder(views), None
        vit: ViT = self.encoder.backbone  # type: ignore[assignment]
        tokens = vit.encode(vit.embed((views - self.encoder.mean) / self.encoder.std))
        return tokens.mean(dim=1), tokens

    def patch_targets(self, tokens: Tensor, like: Tensor) -> Tensor:
        """The student's tokens B×n×d projected and resized (bilinear) to the teacher's grid."""
        vit: ViT = self.encoder.backbone  # type: ignore[assignment]
        (gh, gw), (th, tw) = vit.grid, self.teacher.size  # type: ignore[attr-defined]
        n = like.shape[1]
        h = round(math.sqrt(n * th / tw))
        if h * (n // h) != n:
            raise SelfsupError(f"teacher {self.options.teacher}: {n} patch tokens form no grid")
        x = self.patch_projection(tokens).transpose(1, 2).reshape(len(tokens), -1, gh, gw)
        x = F.interpolate(x, size=(h, n // h), mode="bilinear", align_corners=False)
        return x.flatten(2).transpose(1, 2)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        o = self.options
        views = self.views(x, g)
        target, target_tokens = self.teacher_outputs(views)
        features, tokens = self.student_outputs(views)
        loss = distill_loss(self.projection(features), target, o.loss, o.temperature)
        if tokens is not None and target_tokens is not None:
            student = self.patch_targets(tokens, target_tokens)
            patches = distill_loss(student, target_tokens, o.loss, o.temperature)
            loss = loss + o.patch_weight * patches
        return loss, features
