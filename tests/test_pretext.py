"""Image pretext tasks: the autoencoder (and its link to PCA) and rotation prediction."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import subspace_angles
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

import selfsup
import selfsup.image.methods
from selfsup.core.errors import SelfsupError
from selfsup.image.methods.autoencoder import Autoencoder
from selfsup.image.methods.rotation import Rotation, rotate_batch
from selfsup.image.models.decoders import ConvDecoder

QUICK = dict(data="digits", limit=512, batch_size=128, epochs=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    methods = selfsup.image.methods.METHODS
    monkeypatch.setitem(methods, "autoencoder", "selfsup.image.methods.autoencoder:Autoencoder")
    monkeypatch.setitem(methods, "rotation", "selfsup.image.methods.rotation:Rotation")


def data_info(channels: int = 1, size: tuple[int, int] = (8, 8)) -> dict[str, Any]:
    return {
        "dataset": {"channels": channels, "image_size": list(size), "num_classes": 10},
        "encoder": {
            "backbone": "convnet",
            "in_channels": channels,
            "small_images": True,
            "mean": [0.3] * channels,
            "std": [0.3] * channels,
        },
    }


def images(n: int, channels: int = 1, size: tuple[int, int] = (8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, *size), generator=g, dtype=torch.uint8)


def digits_uint8() -> torch.Tensor:
    """sklearn digits as the `digits` data spec holds them: uint8 N×1×8×8, 0..16 -> 0..255."""
    return torch.from_numpy(np.round(load_digits().images * 255 / 16).astype(np.uint8))[:, None]


# ---- decoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (28, 28), (32, 32), (96, 96), (20, 36)])
@pytest.mark.parametrize("channels", [1, 3])
def test_decoder_gives_images_of_any_size_in_unit_range(
    size: tuple[int, int], channels: int
) -> None:
    torch.manual_seed(0)
    decoder = ConvDecoder(16, channels, size)
    out = decoder(torch.randn(2, 16) * 5)
    assert out.shape == (2, channels, *size)
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    out.mean().backward()
    assert all(p.grad is not None for p in decoder.parameters())


# ---- autoencoder -------------------------------------------------------------------------------


def test_autoencoder_loss_is_mse_to_the_input() -> None:
    torch.manual_seed(0)
    model = Autoencoder.create(data_info(), method="autoencoder", code_dim=12)
    x = images(16)
    loss, features = model.pretext_loss(x, -torch.ones(16, dtype=torch.long), torch.Generator())
    clean = x.float() / 255
    expected_features = model.encoder(clean)
    reconstruction = model.decoder(model.code(expected_features))
    assert reconstruction.shape == clean.shape
    torch.testing.assert_close(loss, ((reconstruction - clean) ** 2).mean())
    torch.testing.assert_close(features, expected_features)


def test_denoising_corrupts_only_the_input() -> None:
    torch.manual_seed(0)
    model = Autoencoder.create(data_info(), method="autoencoder", code_dim=12, denoise=0.3)
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = images(16)
    loss, _ = model.pretext_loss(
        x, -torch.ones(16, dtype=torch.long), torch.Generator().manual_seed(5)
    )
    clean = x.float() / 255
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    noisy = (clean + 0.3 * noise).clamp(0, 1)
    torch.testing.assert_close(seen[0], noisy)
    reconstruction = model.decoder(model.code(model.encoder(noisy)))
    torch.testing.assert_close(loss, F.mse_loss(reconstruction, clean))
    assert not torch.allclose(loss, F.mse_loss(reconstruction, noisy))


def test_linear_autoencoder_loss_by_hand_and_exported_code(
    tmp_path: Path, registered: None
) -> None:
    torch.manual_seed(0)
    options = dict(method="autoencoder", code_dim=5, linear_autoencoder=True)
    info = data_info()
    info["encoder"].update(backbone="linear", image_size=[8, 8], feature_dim=5)
    model = Autoencoder.create(info, **options)
    x = images(16)
    loss, code = model.pretext_loss(x, -torch.ones(16, dtype=torch.long), torch.Generator())
    flat = x.flatten(1).float() / 255
    enc, dec = model.encoder.backbone[1], model.decoder
    torch.testing.assert_close(code, ((flat - 0.3) / 0.3) @ enc.weight.T + enc.bias)
    reconstruction = code @ dec.weight.T + dec.bias
    torch.testing.assert_close(loss, ((reconstruction - flat) ** 2).mean())

    with pytest.raises(SelfsupError, match="--code-dim 64"):
        Autoencoder.create(data_info(), method="autoencoder", code_dim=64, linear_autoencoder=True)

    # The exported encoder of a linear-autoencoder run is the learned linear code.
    run = selfsup.pretrain(
        method="autoencoder", linear_autoencoder=True, code_dim=6, out=str(tmp_path / "r"), **QUICK
    )
    encoder = selfsup.load(run)
    assert encoder.feature_dim == 6 and encoder.config["backbone"] == "linear"
    assert encoder(images(3)).shape == (3, 6)


def test_linear_autoencoder_learns_the_pca_subspace() -> None:
    """Trained with MSE, a linear autoencoder's decoder spans PCA's top-k subspace."""
    k = 10
    x = digits_uint8()
    torch.manual_seed(0)
    options = dict(method="autoencoder", code_dim=k, linear_autoencoder=True)
    info = data_info()
    info["encoder"].update(backbone="linear", image_size=[8, 8], feature_dim=k)
    model = Autoencoder.create(info, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    labels, g = -torch.ones(len(x), dtype=torch.long), torch.Generator()
    for _ in range(600):
        loss, _ = model.pretext_loss(x, labels, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    pixels = x.flatten(1).numpy() / 255
    pca = PCA(k).fit(pixels)
    pca_mse = ((pca.inverse_transform(pca.transform(pixels)) - pixels) ** 2).mean()
    assert loss.item() == pytest.approx(pca_mse, rel=0.01)
    cosines = np.cos(subspace_angles(model.decoder.weight.detach().numpy(), pca.components_.T))
    assert cosines.min() > 0.95, cosines  # measured: all > 0.999

    # Control: a random k-dimensional subspace fails the same bound.
    random = np.random.default_rng(0).standard_normal((64, k))
    assert np.cos(subspace_angles(random, pca.components_.T)).min() < 0.5


# ---- rotation ----------------------------------------------------------------------------------


def test_rotation_batch_holds_all_four_rotations_of_every_image() -> None:
    x = images(3, channels=2, size=(5, 5))
    rotated, labels = rotate_batch(x)
    assert rotated.shape == (12, 2, 5, 5)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for k in range(4):
        for i in range(3):
            assert torch.equal(rotated[k * 3 + i], torch.rot90(x[i], k, dims=(1, 2)))

    wide = images(2, size=(4, 6))  # non-square: the centred 4×4 square
    rotated, labels = rotate_batch(wide)
    assert rotated.shape == (8, 1, 4, 4)
    for k in range(4):
        assert torch.equal(rotated[2 * k : 2 * k + 2], torch.rot90(wide[..., 1:5], k, dims=(2, 3)))


@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_rotation_loss_is_cross_entropy_over_the_rotated_batch(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = Rotation.create(data_info(size=size), method="rotation", recipe="none")
    x = images(6, size=size)
    loss, features = model.pretext_loss(x, -torch.ones(6, dtype=torch.long), torch.Generator())
    rotated, labels = rotate_batch(x.float() / 255)
    all_features = model.encoder(rotated)
    log_p = torch.log_softmax(model.classifier(all_features), dim=1)
    torch.testing.assert_close(loss, -log_p[torch.arange(24), labels].mean())
    torch.testing.assert_close(features, all_features[:6])  # the unrotated images


# ---- end to end --------------------------------------------------------------------------------


def _metric(run: Path, name: str) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.parametrize(
    "method, options",
    [
        ("autoencoder", {"denoise": 0.1}),
        ("autoencoder", {"linear_autoencoder": True, "code_dim": 10}),
        ("rotation", {}),
    ],
)
def test_short_run_exports_encoder_and_samples(
    registered: None, tmp_path: Path, method: str, options: dict
) -> None:
    run = selfsup.pretrain(method=method, out=str(tmp_path / "run"), **QUICK, **options)
    assert (run / "encoder.safetensors").is_file()
    assert (run / "samples/epoch001.png").is_file()
    encoder = selfsup.load(run)
    assert encoder(images(4)).shape == (4, encoder.feature_dim)
    assert len(_metric(run, "train/loss")) == 2 and len(_metric(run, "test/probe_acc")) == 2
    if method == "rotation":
        assert len(_metric(run, "train/rotation_acc")) == 2


def test_rotation_is_learned_on_digits(registered: None, tmp_path: Path) -> None:
    run = selfsup.pretrain(
        method="rotation",
        data="digits",
        limit=512,
        batch_size=64,
        epochs=3,
        recipe="none",
        lr=2e-3,
        out=str(tmp_path / "run"),
    )
    accuracy = _metric(run, "train/rotation_acc")
    assert accuracy[-1] > 0.75, accuracy  # chance 0.25; measured 0.97 (seed 0)
