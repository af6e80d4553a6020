"""Methods without negatives (SimSiam, BYOL, VICReg, Barlow Twins): losses against float64
formulas written from the papers and against lightly where installed; EMA targets by hand; each
method trains through the CLI, and BYOL's target survives --resume exactly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from selfsup.cli.main import main
from selfsup.engine.ema import cosine_momentum, ema_update, frozen_copy
from selfsup.image.losses.noncontrastive import (
    barlow_twins,
    batch_info_nce,
    dino,
    negative_cosine,
    queue_info_nce,
    vicreg,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(n: int = 12, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.7
    return a, a + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)


def _vicreg_by_loops(a, b, lam=25.0, mu=25.0, nu=1.0, eps=1e-4) -> float:
    n, d = a.shape
    a, b = a.tolist(), b.tolist()
    inv = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def std_hinge(z):
        total = 0.0
        for j in range(d):
            m = sum(z[i][j] for i in range(n)) / n
            var = sum((z[i][j] - m) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, 1 - math.sqrt(var + eps))
        return total / d

    def cov_off(z):
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        total = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    c = sum((z[i][j] - means[j]) * (z[i][k] - means[k]) for i in range(n)) / (n - 1)
                    total += c**2
        return total / d

    return lam * inv + mu * (std_hinge(a) + std_hinge(b)) / 2 + nu * (cov_off(a) + cov_off(b))


def _barlow_by_loops(a, b, lam=5e-3, eps=1e-5) -> float:
    n, d = a.shape
    a, b = a.tolist(), b.tolist()

    def standardise(z):
        cols = []
        for j in range(d):
            m = sum(z[i][j] for i in range(n)) / n
            s = math.sqrt(sum((z[i][j] - m) ** 2 for i in range(n)) / n + eps)
            cols.append([(z[i][j] - m) / s for i in range(n)])
        return cols

    za, zb = standardise(a), standardise(b)
    total = 0.0
    for j in range(d):
        for k in range(d):
            c = sum(za[j][i] * zb[k][i] for i in range(n)) / n
            total += (1 - c) ** 2 if j == k else lam * c**2
    return total


def test_vicreg_matches_the_papers_formula_term_by_term() -> None:
    a, b = _pair()
    assert vicreg(a, b).item() == pytest.approx(_vicreg_by_loops(a, b), rel=1e-9)
    # each weight scales its own term (a swapped weight would fail here)
    assert vicreg(a, b, 1.0, 0.0, 0.0).item() == pytest.approx(
        _vicreg_by_loops(a, b, 1.0, 0.0, 0.0), rel=1e-9
    )
    assert vicreg(a, b, 0.0, 1.0, 0.0).item() == pytest.approx(
        _vicreg_by_loops(a, b, 0.0, 1.0, 0.0), rel=1e-9
    )


def test_barlow_twins_matches_the_papers_formula() -> None:
    a, b = _pair()
    assert barlow_twins(a, b).item() == pytest.approx(_barlow_by_loops(a, b), rel=1e-6)
    assert barlow_twins(a, b, 0.5).item() == pytest.approx(_barlow_by_loops(a, b, 0.5), rel=1e-6)


def test_negative_cosine_stops_the_gradient_of_its_target() -> None:
    p, z = (t.requires_grad_() for t in _pair())
    loss = negative_cosine(p, z)
    by_hand = -sum(
        float(p[i] @ z[i]) / (float(p[i].norm()) * float(z[i].norm())) for i in range(len(p))
    ) / len(p)
    assert loss.item() == pytest.approx(by_hand, rel=1e-9)
    loss.backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


def test_moco_loss_is_cross_entropy_against_the_queue_by_hand() -> None:
    q, k = _pair(5, 4)
    queue = _pair(7, 4, seed=1)[0]
    t = 0.2

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    total = 0.0
    for i in range(5):
        qi, ki = unit(q[i].tolist()), unit(k[i].tolist())
        logits = [sum(a * b for a, b in zip(qi, ki, strict=True)) / t]
        logits += [sum(a * b for a, b in zip(qi, unit(n), strict=True)) / t for n in queue.tolist()]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert queue_info_nce(q, k, queue, t).item() == pytest.approx(total / 5, rel=1e-9)


def test_moco_v3_loss_is_cross_entropy_over_the_batch_keys_by_hand() -> None:
    q, k = _pair(4, 3)
    t = 0.5

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    total = 0.0
    keys = [unit(v) for v in k.tolist()]
    for i, qi in enumerate(unit(v) for v in q.tolist()):
        logits = [sum(a * b for a, b in zip(qi, kj, strict=True)) / t for kj in keys]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    expected = total / 4 * 2 * t
    assert batch_info_nce(q, k, t).item() == pytest.approx(expected, rel=1e-9)


def test_moco_queue_overwrites_the_oldest_keys_and_wraps_around() -> None:
    from selfsup.image.methods.moco import MoCo

    info = {
        "dataset": {"channels": 1, "image_size": [8, 8], "num_classes": 0},
        "encoder": {
            "backbone": "convnet",
            "in_channels": 1,
            "small_images": True,
            "mean": [0.3],
            "std": [0.3],
        },
    }
    model = MoCo.create(info, method="moco", queue_size=5, projection_dim=3)
    before = model.queue.clone()
    keys = torch.randn(3, 3)
    model.enqueue(keys)
    torch.testing.assert_close(model.queue[:3], torch.nn.functional.normalize(keys, dim=1))
    torch.testing.assert_close(model.queue[3:], before[3:])
    assert int(model.queue_ptr) == 3
    more = torch.randn(3, 3)
    model.enqueue(more)  # slots 3, 4, then 0
    normal = torch.nn.functional.normalize(more, dim=1)
    torch.testing.assert_close(model.queue[[3, 4, 0]], normal)
    assert int(model.queue_ptr) == 1


def test_dino_loss_by_hand_over_pairs_of_different_views() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]  # 1 local
    center = torch.randn(5, generator=g, dtype=torch.float64) * 0.1
    tt, ts = 0.04, 0.1

    def softmax(v):
        m = max(v)
        e = [math.exp(x - m) for x in v]
        return [x / sum(e) for x in e]

    terms = []
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            for b in range(3):
                p = softmax(
                    [(x - c) / tt for x, c in zip(t[b].tolist(), center.tolist(), strict=True)]
                )
                q = softmax([x / ts for x in s[b].tolist()])
                terms.append(-sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True)))
    expected = sum(terms) / len(terms)
    assert dino(teacher, student, center, tt, ts).item() == pytest.approx(expected, rel=1e-6)


def test_losses_agree_with_lightly() -> None:
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = (t.float() for t in _pair(32, 16))
    torch.testing.assert_close(vicreg(a, b), lightly_loss.VICRegLoss()(a, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        barlow_twins(a, b), lightly_loss.BarlowTwinsLoss()(a, b), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        negative_cosine(a, b), lightly_loss.NegativeCosineSimilarity()(a, b.detach())
    )
    views = [a, b, a.flip(0)]
    reference = lightly_loss.DINOLoss(output_dim=16)  # its centre starts at zero
    ours = dino(views[:2], views, torch.zeros(16), 0.04, 0.1)
    torch.testing.assert_close(ours, reference(views[:2], views, teacher_temp=0.04))


def test_ema_update_and_the_cosine_momentum_schedule_by_hand() -> None:
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = frozen_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(0.5)
    ema_update(target, online, 0.9)
    for t, o, b in zip(target.parameters(), online.parameters(), before, strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)


QUICK = ["--data", "digits", "--limit", "256", "--batch-size", "64", "--epochs", "1"]


@pytest.mark.parametrize(
    "method", ["moco", "moco-v3", "simsiam", "byol", "dino", "vicreg", "barlow-twins", "nnclr"]
)
def test_each_method_trains_from_the_command_line(method: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", method, *QUICK, "--out", str(run)]) == 0
    assert (run / "encoder.safetensors").is_file()


@pytest.mark.parametrize(
    ("method", "kept"),
    [("byol", "target_"), ("moco", "queue"), ("dino", "teacher_"), ("nnclr", "queue")],
)
def test_momentum_state_survives_resume_exactly(
    method: str, kept: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted in its second epoch and resumed, a run ends where an uninterrupted one does:
    BYOL's target network, MoCo's queue and key encoder and NNCLR's support set continue, not
    restart."""
    from selfsup.image.methods import get_method

    cls = get_method(method)
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    argv = ["pretrain", method, *QUICK[:-1], "2"]
    assert main([*argv, "--out", str(straight)]) == 0
    step = cls.training_step

    def interrupted(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(cls, "training_step", interrupted)
    assert main([*argv, "--out", str(halted)]) == 130
    monkeypatch.setattr(cls, "training_step", step)
    assert main(["pretrain", "--resume", str(halted)]) == 0
    a = torch.load(straight / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(halted / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    import csv

    with open(straight / "metrics.csv") as f:
        taus = [float(r["train/momentum"]) for r in csv.DictReader(f) if r.get("train/momentum")]
    if "momentum" in {f.name for f in dataclasses.fields(cls.Options)}:  # NNCLR has none
        assert len(taus) >= 2 and all(0.99 <= t <= 1 for t in taus) and taus == sorted(taus)
    targets = [k for k in a if k.startswith((kept, "key_", "center"))]
    assert targets
    for k in targets:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_multi_crop_keeps_the_recipe_but_splits_the_crop_scale() -> None:
    from selfsup.image.augment.recipes import GLOBAL_SCALE, LOCAL_SCALE, RECIPES, multi_crop

    global_views, local_views = multi_crop("simclr", (32, 32), 12, 3)
    others = [s for s in RECIPES["simclr"]((32, 32), 3) if s[0] != "crop"]
    assert global_views.steps == [("crop", {"size": (32, 32), "scale": GLOBAL_SCALE}), *others]
    assert local_views.steps[0] == ("crop", {"size": (12, 12), "scale": LOCAL_SCALE})
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert global_views(x, g).shape == (5, 3, 32, 32) and local_views(x, g).shape == (5, 3, 12, 12)


def test_dino_multi_crop_gives_the_student_local_views_and_the_teacher_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    import selfsup.image.methods.dino as dino_method

    seen: list[tuple[int, list[tuple[int, ...]]]] = []
    loss = dino_method.dino

    def recording(teacher, student, *args):
        seen.append((len(teacher), [tuple(s.shape) for s in student]))
        return loss(teacher, student, *args)

    monkeypatch.setattr(dino_method, "dino", recording)
    images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=images)
    argv = ["pretrain", "dino", "--data", f"npz:{tmp_path / 'x.npz'}", "--batch-size", "32"]
    argv += ["--epochs", "1", "--local-crops", "3", "--local-size", "8"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    teachers, students = seen[0]
    assert teachers == 2 and len(students) == 5  # 2 global + 3 local views
    assert main(["pretrain", "dino", "--local-crops", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
