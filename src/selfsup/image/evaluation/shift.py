"""Distribution shift: the test images under corruptions of the CIFAR-10-C families (Hendrycks
& Dietterich, 2019), made deterministically on the fly, and the accuracy of a linear probe
trained on the clean training images. Severities 1, 2, 3 here are CIFAR-10-C's 1, 3, 5.

Each corruption takes uint8 images N×C×H×W and returns uint8 images of the same shape.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.core.errors import SelfsupError

# CIFAR-10-C's parameters at its severities 1, 3 and 5 (its `corruptions.py`).
NOISE_STD = (0.04, 0.08, 0.10)
BLUR_SIGMA = (0.4, 0.7, 1.0)
CONTRAST = (0.75, 0.4, 0.15)
JPEG_QUALITY = (80, 58, 40)
BRIGHTNESS = (0.05, 0.15, 0.3)
SEVERITIES = (1, 2, 3)


def _float(x: Tensor) -> Tensor:
    return x.float() / 255


def _uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def gaussian_noise(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + severity)
    noise = torch.randn(x.shape, generator=g) * NOISE_STD[severity - 1]
    return _uint8(_float(x) + noise)


def gaussian_blur(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    sigma = BLUR_SIGMA[severity - 1]
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    y = F.pad(_float(x), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return _uint8(y)


def contrast(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    f = _float(x)
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    return _uint8((f - mean) * CONTRAST[severity - 1] + mean)


def brightness(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    return _uint8(_float(x) + BRIGHTNESS[severity - 1])


def jpeg(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    from PIL import Image

    out = torch.empty_like(x)
    for i, image in enumerate(x):
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=JPEG_QUALITY[severity - 1])
        decoded = np.asarray(Image.open(buffer))
        out[i] = torch.from_numpy(decoded.reshape(array.shape).copy()).permute(2, 0, 1)
    return out


CORRUPTIONS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "gaussian-noise": gaussian_noise,
    "blur": gaussian_blur,
    "contrast": contrast,
    "jpeg": jpeg,
    "brightness": brightness,
}


def corruption_list(spec: str) -> tuple[str, ...]:
    """'all' or a comma list of names -> names; an unknown one is a one-line error."""
    names = (
        tuple(CORRUPTIONS)
        if spec.strip() == "all"
        else tuple(n.strip() for n in spec.split(",") if n.strip())
    )
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise SelfsupError(
            f"--shift {spec!r}: unknown corruption {unknown[0] if unknown else '(none)'}; "
            f"expected 'all' or some of {', '.join(CORRUPTIONS)}"
        )
    return names


def shift_evaluation(
    encoders: dict[str, Callable[[Any], np.ndarray]],
    train_images: Any,
    train_y: np.ndarray,
    test_images: Tensor,
    test_y: np.ndarray,
    corruptions: tuple[str, ...],
    *,
    probe: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]],
    clean: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    classifiers: dict[str, Callable[[Tensor], np.ndarray]] | None = None,
) -> dict[str, Any]:
    """For each representation (name -> features of uint8 images): a probe trained once on the
    clean training features, scored on the clean test images and on every corruption and
    severity. `clean`: (train, test) features already computed, by name. `classifiers` (name ->
    predicted labels of uint8 images, e.g. the supervised reference trained on the clean
    labels) are scored the same way. Each corruption is made once for all of them. Returns
    {method: {"clean": acc, corruption: [acc per severity], "mean_drop": ...}}."""
    predictors: dict[str, Callable[[Tensor], np.ndarray]] = {}
    clean_test: dict[str, np.ndarray] = {}
    for name, features in encoders.items():
        if clean and name in clean:
            train_f, test_f = clean[name]
        else:
            train_f, test_f = features(train_images), features(test_images)
        predict = probe(train_f, train_y)
        predictors[name] = lambda images, p=predict, f=features: p(f(images))
        clean_test[name] = predict(test_f)
    for name, classify in (classifiers or {}).items():
        predictors[name] = classify
        clean_test[name] = classify(test_images)
    rows: dict[str, Any] = {
        name: {"clean": float(np.mean(pred == test_y))} for name, pred in clean_test.items()
    }
    for corruption in corruptions:
        for name in rows:
            rows[name][corruption] = []
        for severity in SEVERITIES:
            corrupted = CORRUPTIONS[corruption](test_images, severity, 0)
            for name, predict_images in predictors.items():
                rows[name][corruption].append(float(np.mean(predict_images(corrupted) == test_y)))
    for row in rows.values():
        row["mean_drop"] = float(np.mean([row["clean"] - a for c in corruptions for a in row[c]]))
    return rows


def format_shift_table(results: dict[str, Any], corruptions: tuple[str, ...]) -> str:
    """Accuracy (%) per method: clean, then each corruption at severities 1/2/3, mean drop."""
    header = f"{'method':<10}{'clean':>7}  " + "  ".join(f"{c:>16}" for c in corruptions)
    lines = [header + f"  {'mean drop':>9}", "-" * (len(header) + 11)]
    for name, row in results.items():
        cells = ["/".join(f"{100 * a:.0f}" for a in row[c]) for c in corruptions]
        lines.append(
            f"{name:<10}{100 * row['clean']:>7.1f}  "
            + "  ".join(f"{cell:>16}" for cell in cells)
            + f"  {100 * row['mean_drop']:>9.1f}"
        )
    return "\n".join(lines)
