"""Colorization: Lab, ab bins, soft targets, rebalancing, the L-only encoder, training, errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.color import lab_to_rgb

import selfsup
from selfsup.core.errors import SelfsupError
from selfsup.image.methods.colorization import (
    Colorization,
    ab_bins,
    decode_ab,
    rebalancing_weights,
    soft_encode,
    to_lab,
)
from selfsup.image.models import Encoder
from selfsup.image.use.samples import regenerate_samples

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR = SHARED / "cifar10"
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")


pytestmark = pytest.mark.usefixtures("one_thread")


def data_info(
    channels: int = 3, mean: list[float] | None = None, size: tuple[int, int] = (32, 32)
) -> dict[str, Any]:
    mean = mean or [0.49, 0.48, 0.45][:channels]
    return {
        "dataset": {"channels": channels, "image_size": list(size), "num_classes": 10},
        "encoder": {
            "backbone": "convnet",
            "in_channels": channels,
            "small_images": True,
            "mean": mean,
            "std": [0.25] * channels,
        },
    }


def model(**options: Any) -> Colorization:
    torch.manual_seed(0)
    method = Colorization.create(data_info(), method="colorization", **options)
    method.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer here
    return method


def cifar(n: int) -> torch.Tensor:
    with np.load(CIFAR / "test.npz") as f:
        return torch.from_numpy(f["x"][:n]).permute(0, 3, 1, 2).contiguous()


# ---- Lab, bins and targets ---------------------------------------------------------------------


def test_lab_of_known_colours_and_round_trip() -> None:
    rgb = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 1, 4)
    lightness, ab = to_lab(rgb)
    # CIE Lab (D65) of white, black, sRGB red and mid-grey, from the standard formulas.
    expected_l = torch.tensor([100.0, 0.0, 53.24, 53.39])
    torch.testing.assert_close(lightness.flatten(), expected_l, atol=0.02, rtol=0)
    torch.testing.assert_close(ab[0, :, 0, 2], torch.tensor([80.09, 67.20]), atol=0.05, rtol=0)
    assert ab[..., [0, 1, 3]].abs().max() < 0.01  # greys have (almost: kornia's D65) no colour
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    lightness, ab = to_lab(x.to(torch.uint8))
    back = lab_to_rgb(torch.cat([lightness, ab], dim=1))
    torch.testing.assert_close(back, x.float() / 255, atol=1e-4, rtol=0)


def test_bins_cover_the_srgb_gamut() -> None:
    centres = ab_bins(10.0)
    assert len(centres) == 261  # the paper's looser gamut hull gives 313
    assert (
        torch.equal(centres, torch.round(centres / 10) * 10) and len(centres.unique(dim=0)) == 261
    )
    # Every colour lies in its nearest bin: at most half a diagonal from the centre.
    _, ab = to_lab(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    nearest = torch.cdist(ab.flatten(2)[0].T, centres).min(dim=1).values
    assert nearest.max() <= 10 * math.sqrt(2) / 2 + 1e-4
    assert len(ab_bins(20.0)) < len(centres) < len(ab_bins(5.0))


def test_soft_encoding_and_decoding_by_hand() -> None:
    centres = ab_bins(10.0)
    ab = torch.tensor([[20.0, -30.0], [3.0, 4.0]]).T.reshape(1, 2, 1, 2)
    targets = soft_encode(ab, centres)
    assert targets.shape == (1, len(centres), 1, 2)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(1, 1, 2))
    for pixel, value in enumerate([(20.0, -30.0), (3.0, 4.0)]):
        weights = targets[0, :, 0, pixel]
        assert (weights > 0).sum() == 5
        d = (centres - torch.tensor(value)).norm(dim=1)
        five = d.argsort()[:5]
        expected = torch.softmax(-(d[five] ** 2) / (2 * 5.0**2), dim=0)
        torch.testing.assert_close(weights[five], expected)
    assert targets[0, :, 0, 0].argmax() == (centres == torch.tensor([20.0, -30.0])).all(1).nonzero()
    # A confident distribution decodes to its bin's centre; a flat one to the mean centre.
    logits = torch.full((1, len(centres), 1, 1), -50.0)
    logits[0, 7] = 50.0
    torch.testing.assert_close(decode_ab(logits, centres)[0, :, 0, 0], centres[7])
    flat = decode_ab(torch.zeros(1, len(centres), 1, 1), centres, temperature=1.0)
    torch.testing.assert_close(flat[0, :, 0, 0], centres.mean(dim=0))


def test_rebalancing_weights_by_hand() -> None:
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])  # far apart: no smoothing
    weights = rebalancing_weights(torch.tensor([8.0, 1.0, 1.0]), centres, mix=0.5)
    prior = torch.tensor([0.8, 0.1, 0.1])
    expected = 1 / (0.5 * prior + 0.5 / 3)
    expected = expected / (prior * expected).sum()
    torch.testing.assert_close(weights, expected)
    assert weights[1] > weights[0]  # rare colours weigh more
    torch.testing.assert_close((prior * weights).sum(), torch.tensor(1.0))
    none = rebalancing_weights(torch.tensor([8.0, 1.0, 1.0]), centres, mix=1.0)
    torch.testing.assert_close(none, torch.ones(3))


# ---- the model ---------------------------------------------------------------------------------


def test_encoder_takes_rgb_and_sees_only_lightness() -> None:
    method = model(recipe="none").eval()
    encoder = method.encoder
    assert encoder.config["lightness"] and encoder.config["in_channels"] == 3
    assert encoder.backbone.blocks[0][0].in_channels == 1
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    lightness, _ = to_lab(x)
    with torch.no_grad():
        features = encoder(x)
        torch.testing.assert_close(features, encoder.backbone((lightness / 100 - 0.5) / 1.0))
        torch.testing.assert_close(features, method.predict(lightness)[1])  # the map's mean
        # Two images with the same lightness but other colours give the same features.
        gray = lab_to_rgb(torch.cat([lightness, torch.zeros_like(lightness).repeat(1, 2, 1, 1)], 1))
        torch.testing.assert_close(encoder(gray.clamp(0, 1)), features, atol=2e-3, rtol=0)
    rebuilt = Encoder(**encoder.config)
    rebuilt.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), features)


def test_loss_is_the_rebalanced_soft_cross_entropy() -> None:
    method = model(recipe="none")
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    loss, features = method.pretext_loss(x, -torch.ones(6, dtype=torch.long), torch.Generator())
    lightness, ab = to_lab(x)
    logits, expected_features = method.predict(lightness)
    targets = soft_encode(F.adaptive_avg_pool2d(ab, (8, 8)), method.centres)
    hard = targets.argmax(1)
    counts = torch.bincount(hard.flatten(), minlength=len(method.centres)).float()
    assert torch.equal(method.counts, counts)
    weights = rebalancing_weights(counts, method.centres, 0.5)[hard]
    expected = (weights * -(targets * logits.log_softmax(1)).sum(1)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(features, expected_features)


@needs_cifar
def test_colour_loss_falls_on_a_real_cifar_batch() -> None:
    method = model(recipe="none")
    x, unlabeled = cifar(32), -torch.ones(32, dtype=torch.long)
    optimizer = torch.optim.Adam(method.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        loss, _ = method.pretext_loss(x, unlabeled, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "info", "message"),
    [
        ({}, data_info(channels=1), r"^--data digits has 1-channel images: colorization"),
        ({}, data_info(mean=[0.4] * 3), r"^--data digits has grayscale images: colorization"),
        ({"backbone": "vit-mini"}, data_info(), r"^--backbone vit-mini: colorization needs"),
        ({"ab_grid": 1.0}, data_info(), r"^--ab-grid is in ab units, between 2 and 50"),
        ({"rebalance": 0.0}, data_info(), r"^--rebalance mixes a uniform prior in"),
    ],
)
def test_bad_input_is_one_line(options: dict, info: dict, message: str) -> None:
    with pytest.raises(SelfsupError, match=message) as error:
        Colorization.create(info, method="colorization", **options)
    assert "\n" not in str(error.value)


def test_grayscale_data_stops_before_the_run_directory(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="--data digits has 1-channel images"):
        selfsup.pretrain(method="colorization", data="digits", out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---- a whole run -------------------------------------------------------------------------------


def npz_folder(folder: Path, source: Path, train: int, test: int) -> Path:
    with np.load(source) as f:
        x, y, classes = f["x"][: train + test], f["y"][: train + test], f["classes"]
    folder.mkdir()
    np.savez(folder / "train.npz", x=x[:train], y=y[:train], classes=classes)
    np.savez(folder / "test.npz", x=x[train:], y=y[train:], classes=classes)
    return folder


@needs_cifar
@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="needs ../shared/data/mnist")
def test_run_samples_and_evaluation_on_rgb_and_gray_data(tmp_path: Path) -> None:
    data = npz_folder(tmp_path / "cifar", CIFAR / "test.npz", 128, 64)
    run = selfsup.pretrain(
        method="colorization", data=f"npz:{data}", batch_size=64, epochs=1, out=str(tmp_path / "r")
    )
    assert (run / "samples" / "epoch000.png").is_file()
    assert selfsup.load(run).config["lightness"] is True
    features, labels = selfsup.embed(run, split="test")
    assert features.shape == (64, 256) and np.isfinite(features).all() and len(labels) == 64
    quick = dict(fractions="1", seeds=1, baselines="random", kmeans=False)
    results = selfsup.evaluate(run, **quick)
    assert 0 <= results["linear_probe"] <= 1
    # Transfer to gray 28×28 MNIST: its images become RGB 32×32 for the RGB-taking encoder.
    mnist = npz_folder(tmp_path / "mnist", SHARED / "mnist" / "test.npz", 100, 50)
    transfer = selfsup.evaluate(run, data=f"npz:{mnist}", **quick)
    assert transfer["test_size"] == 50 and 0 <= transfer["linear_probe"] <= 1
    redrawn = regenerate_samples(run, out=tmp_path / "again.png")
    assert redrawn.is_file() and redrawn.stat().st_size > 10_000
