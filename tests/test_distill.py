"""`selfsup pretrain distill` (image/methods/distill.py): its losses against float64 formulas
written out here; a student distilled from a fixed random teacher moves towards it; the teacher is
in no checkpoint, optimiser or export, and --resume rebuilds it from its source; a bad teacher is
one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits

import selfsup
from selfsup.core.errors import SelfsupError
from selfsup.image.methods import get_method
from selfsup.image.methods.distill import distill_loss
from selfsup.image.models.backbones import backbone_size

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_teacher(folder: Path, seed: int = 0) -> Path:
    """A tiny random Hugging Face DINOv2 (16 px, 4 px patches, 32 wide) saved in `folder`."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2, image_size=16, patch_size=4,
        intermediate_size=64,
    )  # fmt: skip
    Dinov2Model(config).save_pretrained(folder)
    return folder


def info(backbone: str = "convnet", channels: int = 1, side: int = 8) -> dict:
    vit = {"image_size": [side, side], "patch_size": 4} if backbone.startswith("vit") else {}
    return {
        "dataset": {"channels": channels, "image_size": [side, side], "num_classes": 10},
        "encoder": {"backbone": backbone, "in_channels": channels, "small_images": True,
                    "mean": [0.3] * channels, "std": [0.3] * channels,
                    **backbone_size(backbone, [side, side]), **vit},
    }  # fmt: skip


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    return x, torch.from_numpy(d.target)


def _kl64(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    """KL(teacher || student) of the similarity rows, one row at a time, float64."""
    unit = lambda a: a / np.sqrt((a * a).sum(axis=1, keepdims=True))  # noqa: E731
    s, t = unit(s), unit(t)
    total = 0.0
    for i in range(len(t)):
        q = np.exp(t @ t[i] / temperature)
        p = np.exp(t @ s[i] / temperature)
        q, p = q / q.sum(), p / p.sum()
        total += float((q * np.log(q / p)).sum())
    return total / len(t)


def test_losses_equal_float64_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    a, b = s.double().numpy(), t.double().numpy()
    cos = np.mean([1 - a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i]) for i in range(6)])
    torch.testing.assert_close(
        distill_loss(s, t, "cosine", 1.0).double(), torch.tensor(cos).double()
    )
    mse = ((a - b) ** 2).mean()
    torch.testing.assert_close(distill_loss(s, t, "mse", 1.0).double(), torch.tensor(mse).double())
    kl = _kl64(a, b, 0.5)
    torch.testing.assert_close(distill_loss(s, t, "kl", 0.5).double(), torch.tensor(kl).double())
    # patch tokens B×N×D: kl scores each token against its own image's tokens
    s3, t3 = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    want = np.mean([_kl64(s3[i].double().numpy(), t3[i].double().numpy(), 0.2) for i in range(2)])
    torch.testing.assert_close(
        distill_loss(s3, t3, "kl", 0.2).double(), torch.tensor(want).double()
    )


@pytest.mark.parametrize("loss", ["cosine", "kl"])
def test_a_student_distilled_from_a_fixed_random_teacher_moves_towards_it(
    tmp_path: Path, loss: str
) -> None:
    teacher_dir = hf_teacher(tmp_path / "teacher")
    torch.manual_seed(0)
    model = get_method("distill").create(
        info(), method="distill", teacher=str(teacher_dir), loss=loss
    )
    x, _ = digits()
    train, held = x[:1500], x[1500:]

    def agreement() -> tuple[float, float]:
        """Mean cosine of projected student and teacher features on held-out images, raw and
        centred by the teacher's mean (which images differ how)."""
        model.eval()
        with torch.no_grad():
            s, t = model.projection(model.encoder(held)), model.teacher(held)
        model.train()
        raw = torch.nn.functional.cosine_similarity(s, t).mean()
        centred = torch.nn.functional.cosine_similarity(s - s.mean(0), t - t.mean(0)).mean()
        return float(raw), float(centred)

    before = agreement()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = train[torch.randperm(len(train), generator=g)[:64]]
        loss_value, _ = model.pretext_loss(batch, torch.zeros(64), g)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
    after = agreement()
    assert after[0] > before[0] + 0.05 and after[1] > before[1] + 0.08, (before, after)
    # the teacher did not move and takes no part in the optimiser
    assert not any(p.requires_grad for p in model.teacher.parameters())
    fresh = get_method("distill").create(info(), method="distill", teacher=str(teacher_dir))
    for a, b in zip(
        model.teacher.state_dict().values(), fresh.teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_vit_student_and_teacher_also_match_patch_tokens(tmp_path: Path) -> None:
    teacher = str(hf_teacher(tmp_path / "teacher"))
    spec = info("vit-mini", channels=3, side=16)
    torch.manual_seed(0)
    model = get_method("distill").create(
        spec, method="distill", teacher=teacher, backbone="vit-mini"
    )
    assert model.distills_patches
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    both, _ = model.pretext_loss(x, torch.zeros(4), torch.Generator().manual_seed(1))
    model.options.patch_weight = 0.0
    pooled, _ = model.pretext_loss(x, torch.zeros(4), torch.Generator().manual_seed(1))
    assert both > pooled  # the patch term adds 1 - cos of 16 tokens on the teacher's 4×4 grid
    both.backward()
    assert model.patch_projection.weight.grad is not None


def test_checkpoint_and_export_hold_no_teacher_and_resume_rebuilds_it(tmp_path: Path) -> None:
    teacher_dir = hf_teacher(tmp_path / "teacher")
    quick = dict(data="digits", limit=256, batch_size=64, progress="none")
    run = selfsup.pretrain(
        method="distill", teacher=str(teacher_dir), epochs=1, out=str(tmp_path / "run"), **quick
    )
    teacher = [v for v in get_method("distill").create(info(), method="distill",
               teacher=str(teacher_dir)).teacher.state_dict().values()]  # fmt: skip
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    exported = load_file(run / "encoder.safetensors")
    for tensors in (state["state_dict"], exported):
        assert not [k for k in tensors if "teacher" in k]
        for v in tensors.values():  # no tensor of the teacher under any name
            assert not any(
                v.shape == w.shape and torch.equal(v, w) for w in teacher if w.numel() > 1
            )
    assert {k.split(".")[0] for k in state["state_dict"]} == {"encoder", "probe", "projection"}
    optimiser_params = sum(len(g["params"]) for g in state["optimizer_states"][0]["param_groups"])
    assert optimiser_params == sum(1 for k in state["state_dict"] if "running" not in k
                                   and "num_batches" not in k and k.split(".")[-1] not in
                                   ("mean", "std"))  # fmt: skip
    steps = state["global_step"]
    # --resume rebuilds the teacher from its source: gone, it is one line; back, training goes on
    shutil.move(teacher_dir, tmp_path / "moved")
    with pytest.raises(SelfsupError, match="teacher") as e:
        selfsup.pretrain(resume=str(run), epochs=2)
    assert "\n" not in str(e.value)
    shutil.move(tmp_path / "moved", teacher_dir)
    selfsup.pretrain(resume=str(run), epochs=2)
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 2 * steps and resumed["epoch"] == 1
    # a selfsup run is a teacher too (its encoder, its own statistics and image size)
    model = get_method("distill").create(info(), method="distill", teacher=str(run))
    assert model.teacher.width == 256 and model.teacher.size == (8, 8)


def test_a_bad_teacher_is_one_line(tmp_path: Path) -> None:
    quick = dict(method="distill", data="digits", limit=128, batch_size=64, epochs=1)
    cases = [
        ({}, "--teacher is required"),
        ({"teacher": str(tmp_path / "absent")}, "expected a selfsup run folder"),
        ({"teacher": "torchvision:resnet18"}, "needs its weights"),
        ({"teacher": str(hf_teacher(tmp_path / "t")), "loss": "l1"}, "--loss 'l1' is unknown"),
    ]
    for extra, expected in cases:
        with pytest.raises(SelfsupError, match=expected) as e:
            selfsup.pretrain(out=str(tmp_path / "run"), **quick, **extra)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "run").exists()
