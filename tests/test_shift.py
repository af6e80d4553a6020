"""Distribution shift: the CIFAR-10-C-style corruptions against independent references, and
`selfsup evaluate --shift` end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli.main import main
from selfsup.image.evaluation.shift import (
    BLUR_SIGMA,
    BRIGHTNESS,
    CONTRAST,
    CORRUPTIONS,
    JPEG_QUALITY,
    NOISE_STD,
    SEVERITIES,
)


def _images(n: int = 4, c: int = 3) -> torch.Tensor:
    return torch.randint(40, 216, (n, c, 16, 16), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def test_contrast_and_brightness_by_hand() -> None:
    x = _images()
    f = x.double() / 255
    for s in SEVERITIES:
        mean = f.mean(dim=(1, 2, 3), keepdim=True)
        expected = ((f - mean) * CONTRAST[s - 1] + mean).clamp(0, 1) * 255
        assert (CORRUPTIONS["contrast"](x, s).double() - expected.round()).abs().max() <= 1
        expected = (f + BRIGHTNESS[s - 1]).clamp(0, 1) * 255
        assert (CORRUPTIONS["brightness"](x, s).double() - expected.round()).abs().max() <= 1


def test_blur_matches_torchvision_and_noise_has_its_std() -> None:
    from torchvision.transforms.functional import gaussian_blur

    x = _images()
    for s in SEVERITIES:
        sigma = BLUR_SIGMA[s - 1]
        size = 2 * max(1, int(np.ceil(3 * sigma))) + 1
        reference = gaussian_blur(x.float() / 255, [size, size], [sigma, sigma]) * 255
        assert (CORRUPTIONS["blur"](x, s).float() - reference.round()).abs().max() <= 1
        gray = torch.full((64, 3, 16, 16), 128, dtype=torch.uint8)
        noisy = CORRUPTIONS["gaussian-noise"](gray, s)
        assert torch.equal(noisy, CORRUPTIONS["gaussian-noise"](gray, s))  # deterministic
        std = (noisy.float() - 128).std().item() / 255
        assert std == pytest.approx(NOISE_STD[s - 1], rel=0.05)


def test_jpeg_is_pils_round_trip_at_the_severitys_quality() -> None:
    x = _images(2)
    for s in SEVERITIES:
        got = CORRUPTIONS["jpeg"](x, s)
        for i in range(2):
            buffer = io.BytesIO()
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(
                buffer, format="JPEG", quality=JPEG_QUALITY[s - 1]
            )
            expected = np.asarray(Image.open(buffer))
            assert np.array_equal(got[i].permute(1, 2, 0).numpy(), expected)


def test_every_corruption_moves_further_with_severity() -> None:
    x = _images(8)
    for name, corrupt in CORRUPTIONS.items():
        distance = [(corrupt(x, s).float() - x.float()).abs().mean().item() for s in SEVERITIES]
        assert distance == sorted(distance) and distance[0] > 0, (name, distance)


def test_evaluate_with_shift(digits_run: Path, capsys) -> None:
    argv = ["evaluate", str(digits_run), "--fractions", "1", "--seeds", "1", "--no-kmeans"]
    capsys.readouterr()
    assert main([*argv, "--baselines", "raw", "--shift", "contrast,blur"]) == 0
    out = capsys.readouterr().out
    assert "distribution shift" in out and "mean drop" in out
    results = json.loads((digits_run / "eval" / "digits" / "results.json").read_text())
    shift = results["shift"]
    assert set(shift) == {"selfsup", "raw"} and results["shift_corruptions"] == ["contrast", "blur"]
    # the clean column is the same probe as the all-labels linear probe
    assert shift["selfsup"]["clean"] == pytest.approx(results["linear_probe"], abs=0.006)
    for row in shift.values():
        assert len(row["contrast"]) == 3 and row["contrast"][2] < row["clean"]
    assert (digits_run / "eval" / "digits" / "shift.png").is_file()
    capsys.readouterr()
    assert main([*argv, "--shift", "fog"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown corruption fog" in err and len(err.splitlines()) == 1


def test_supervised_reference_under_shift(digits_run: Path, capsys) -> None:
    """The supervised network trained on the clean labels is scored under shift too; its clean
    column is the few-label table's supervised row on the same labels and seed (100%, seed 0)."""
    argv = ["evaluate", str(digits_run), "--fractions", "1", "--seeds", "1", "--no-kmeans"]
    assert main([*argv, "--baselines", "supervised", "--shift", "contrast"]) == 0
    assert "supervised" in capsys.readouterr().out
    results = json.loads((digits_run / "eval" / "digits" / "results.json").read_text())
    shift = results["shift"]
    assert set(shift) == {"selfsup", "supervised"}
    (row,) = [r for r in results["few_label"] if r["method"] == "supervised"]
    assert shift["supervised"]["clean"] == pytest.approx(row["accuracy"], abs=1e-9)
    contrast = shift["supervised"]["contrast"]
    assert len(contrast) == 3 and contrast[2] < shift["supervised"]["clean"]
    drops = [shift["supervised"]["clean"] - a for a in contrast]
    assert shift["supervised"]["mean_drop"] == pytest.approx(np.mean(drops))
