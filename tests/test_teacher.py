"""Frozen distillation teachers (image/models/teacher.py): a timm model from its state dict and
a Hugging Face folder give their own library's features in their own resolution and
normalisation; frozen; one line for a source that is none of the known kinds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from selfsup.core.errors import SelfsupError
from selfsup.image.models.teacher import build_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def _uint8(n: int, side: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), generator=g).to(torch.uint8)


def test_timm_teacher_from_a_state_dict_gives_timms_own_features(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False).eval()  # with its fc head
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    teacher = build_teacher("timm:resnet18", weights=str(path))
    cfg = timm.data.resolve_data_config(model=reference)  # timm's own input settings
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    assert teacher.size == tuple(cfg["input_size"][1:]) and teacher.width == 512

    def timm_features(x: torch.Tensor) -> torch.Tensor:
        return reference.forward_head(reference.forward_features((x - mean) / std), True)

    x = _uint8(2, 224)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), timm_features(x / 255), atol=1e-6, rtol=1e-6)
        small = _uint8(2, 32)  # resized to the teacher's own 224 px first
        big = resize(small / 255, [224, 224], InterpolationMode.BICUBIC, antialias=True)
        torch.testing.assert_close(teacher(small), timm_features(big), atol=1e-5, rtol=1e-5)
    assert teacher.encode(x).patch_tokens is None  # a CNN: pooled features only
    # frozen: no gradients, eval mode kept by train()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.train().model.training


def test_hf_folder_teacher_gives_transformers_own_outputs(tmp_path: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    config = Dinov2Config(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2, image_size=28, patch_size=4
    )
    model = Dinov2Model(config).eval()
    model.save_pretrained(tmp_path)
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
    )
    processor.save_pretrained(tmp_path)
    teacher = build_teacher(str(tmp_path))
    assert teacher.size == (28, 28) and teacher.width == 32
    x = _uint8(2, 28)
    images = [np.ascontiguousarray(i.permute(1, 2, 0).numpy()) for i in x]
    pixels = processor(images, do_resize=False, do_center_crop=False, return_tensors="pt")
    with torch.no_grad():
        want = model(pixel_values=pixels["pixel_values"].float())
        got = teacher.encode(x)
    torch.testing.assert_close(got.features, want.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got.patch_tokens, want.last_hidden_state[:, 1:], atol=1e-5, rtol=1e-5
    )


def test_a_source_that_is_no_teacher_is_one_line(tmp_path: Path) -> None:
    cases = [
        (str(tmp_path), "expected a selfsup run folder (config.yaml), a Hugging Face model"),
        ("torchvision:resnet18", "needs its weights, a file (teacher weights) or pretrained"),
    ]
    for source, expected in cases:
        with pytest.raises(SelfsupError, match=re.escape(expected)) as e:
            build_teacher(source)
        assert "\n" not in str(e.value)
