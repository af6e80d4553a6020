"""Frozen teachers for distillation: a pretrained model that maps images to features in its own
input resolution and normalisation, whatever the student's data look like.

`build_teacher(source)` takes another selfsup run's folder, `timm:NAME` / `torchvision:NAME`
(with a weights file, loaded as `--init-weights` loads one, or the library's published weights)
or a Hugging Face vision model folder (config.json + model.safetensors, AutoModel; features are
its pooled output, else its CLS token). Timm models resize and normalise as their
`pretrained_cfg` says, torchvision models as their weights' transforms, Hugging Face models as
their preprocessor_config.json (its crop size). ViTs also give their patch tokens.

A teacher's weights never train (`requires_grad` off, always in eval mode); a method that holds
one as a submodule should leave it out of its checkpoint and its export (it is rebuilt from its
source).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.core.errors import SelfsupError
from selfsup.image.models.external import build_external, is_external, resolve

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # preprocessor_config.json's `resample`


@dataclass
class TeacherOutput:
    """Pooled features B×D and, for ViTs, patch tokens B×N×D (else None)."""

    features: Tensor
    patch_tokens: Tensor | None


class Teacher(nn.Module):
    """uint8 (0-255) or float ([0, 1]) images B×C×H×W -> the frozen model's features B×D, the
    images resized to `size` (`interpolation`, antialiased) and normalised by `mean`/`std`.

    `kind`: "timm" (forward_features, then its own pooling), "hf" (a transformers model:
    pooler_output, else the CLS token), "vit" (selfsup's ViT: mean of its tokens) or "module"
    (the model's output is the features; no patch tokens)."""

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        *,
        size: tuple[int, int],
        mean: list[float],
        std: list[float],
        interpolation: str = "bicubic",
        prefix_tokens: int = 1,
        source: str = "",
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind, self.size, self.interpolation = kind, tuple(size), interpolation
        self.prefix_tokens, self.source = prefix_tokens, source
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.width = int(self.encode(torch.zeros(1, len(mean), *self.size)).features.shape[1])

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: BatchNorm statistics and dropout stay as loaded

    def prepare(self, x: Tensor) -> Tensor:
        """Images as the model takes them: [0, 1], resized to its size, normalised; one-channel
        images repeated to the teacher's channels."""
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255
        channels = self.mean.shape[1]
        if x.shape[1] != channels:
            if x.shape[1] != 1:
                raise SelfsupError(
                    f"teacher {self.source} takes {channels}-channel images, got {x.shape[1]}"
                )
            x = x.expand(-1, channels, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, self.size, mode=self.interpolation, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode(self, x: Tensor) -> TeacherOutput:
        """Features and (ViTs) patch tokens of images x."""
        x, m = self.prepare(x), self.model
        if self.kind == "timm":
            tokens = m.forward_features(x)
            patches = tokens[:, m.num_prefix_tokens :] if tokens.ndim == 3 else None
            return TeacherOutput(m.forward_head(tokens, pre_logits=True), patches)
        if self.kind == "hf":
            out = m(pixel_values=x)
            hidden = out.last_hidden_state
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                pooled = hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(2, 3))
            patches = hidden[:, self.prefix_tokens :] if hidden.ndim == 3 else None
            return TeacherOutput(pooled.flatten(1), patches)
        if self.kind == "vit":
            tokens = m.encode(m.embed(x))
            return TeacherOutput(tokens.mean(dim=1), tokens)
        return TeacherOutput(m(x), None)

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x).features


def build_teacher(
    source: str,
    *,
    weights: str | None = None,
    pretrained: bool = False,
    image_size: int | None = None,
) -> Teacher:
    """The frozen teacher named by `source`: a selfsup run folder, `timm:NAME` /
    `torchvision:NAME` (`weights` a file, or `pretrained`), or a Hugging Face model folder.
    `image_size` overrides a timm/torchvision teacher's own input size (timm ViTs' positions
    are resampled to it)."""
    path = Path(source)
    if is_external(source):
        return _library_teacher(source, weights, pretrained, image_size)
    if weights or pretrained:
        raise SelfsupError(
            f"teacher {source}: teacher weights and pretrained apply to timm:NAME or "
            "torchvision:NAME teachers (a run or a Hugging Face folder holds its own)"
        )
    if (path / "config.json").is_file():
        return _hf_teacher(path)
    if (path / "config.yaml").is_file():
        return _run_teacher(path)
    raise SelfsupError(
        f"teacher {source}: expected a selfsup run folder (config.yaml), a Hugging Face model "
        "folder (config.json + model.safetensors), timm:NAME or torchvision:NAME"
    )


def _library_teacher(
    name: str, weights: str | None, pretrained: bool, image_size: int | None
) -> Teacher:
    from selfsup.image.models.init_weights import load_init_weights, load_pretrained

    if not weights and not pretrained:
        raise SelfsupError(
            f"teacher {name}: needs its weights, a file (teacher weights) or pretrained; a "
            "randomly initialised teacher teaches nothing"
        )
    library, arch = resolve(name)
    size = [image_size, image_size] if image_size else None
    backbone, _ = build_external(name, 3, size)
    if weights:
        load_init_weights(backbone, weights, what=f"teacher {name}")
    else:
        load_pretrained(backbone, what=f"teacher {name}")
    model = backbone.model
    if library == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        own = tuple(getattr(getattr(model, "patch_embed", None), "img_size", cfg["input_size"][1:]))
        return Teacher(
            model,
            "timm",
            size=tuple(size or own),  # type: ignore[arg-type]
            mean=list(cfg["mean"]),
            std=list(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            source=name,
        )
    from torchvision.models import get_model_weights

    transforms = get_model_weights(arch).DEFAULT.transforms()
    crop = image_size or transforms.crop_size[0]
    return Teacher(
        model,
        "module",
        size=(crop, crop),
        mean=list(transforms.mean),
        std=list(transforms.std),
        interpolation=transforms.interpolation.value,
        source=name,
    )


def _hf_teacher(folder: Path) -> Teacher:
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a folder it cannot load
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SelfsupError(f"teacher {folder}: transformers cannot load it ({first})") from None
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    size = _hf_size(pre, model.config)
    mean, std = pre.get("image_mean", IMAGENET[0]), pre.get("image_std", IMAGENET[1])
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    return Teacher(
        model,
        "hf",
        size=size,
        mean=list(mean),
        std=list(std),
        interpolation=PIL_RESAMPLE.get(pre.get("resample", 2), "bilinear"),
        prefix_tokens=prefix,
        source=str(folder),
    )


def _hf_size(pre: dict, config: object) -> tuple[int, int]:
    """The input size a preprocessor_config.json gives (its crop, else its resize), else the
    model config's image_size (224 without one)."""
    size = pre.get("crop_size") if pre.get("do_center_crop", True) else None
    size = size or pre.get("size")
    if isinstance(size, dict):
        if "height" in size:
            return int(size["height"]), int(size["width"])
        size = size.get("shortest_edge")
    if size is None:
        size = getattr(config, "image_size", 224)
    side = size if isinstance(size, int) else size[0]
    return int(side), int(side)


def _run_teacher(run: Path) -> Teacher:
    """A selfsup run's encoder: its own data statistics and image size."""
    from selfsup.image.models.external import ExternalBackbone
    from selfsup.image.models.vit import ViT
    from selfsup.image.runs import load_encoder

    encoder = load_encoder(run)
    h, w = encoder.config.get("image_size") or _run_image_size(run)
    common = dict(size=(h, w), source=str(run))
    if encoder.lightness:  # colorization: the encoder converts RGB itself
        channels = encoder.config["in_channels"]
        return Teacher(encoder, "module", mean=[0.0] * channels, std=[1.0] * channels, **common)
    stats = dict(mean=encoder.config["mean"], std=encoder.config["std"])
    backbone = encoder.backbone
    if isinstance(backbone, ViT):
        return Teacher(backbone, "vit", **stats, **common)  # type: ignore[arg-type]
    if isinstance(backbone, ExternalBackbone) and backbone.name.startswith("timm:"):
        prefix = backbone.model.num_prefix_tokens
        return Teacher(backbone.model, "timm", prefix_tokens=prefix, **stats, **common)
    return Teacher(backbone, "module", **stats, **common)  # type: ignore[arg-type]


def _run_image_size(run: Path) -> list[int]:
    from selfsup.core.run import read_config

    return list(read_config(run)["dataset"]["image_size"])
