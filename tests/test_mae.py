"""Masked autoencoder: patches, the random visible/hidden split, targets, loss, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import selfsup
from selfsup.core.errors import SelfsupError
from selfsup.image.methods.mae import (
    MAE,
    _gather_tokens,
    patch_targets,
    patchify,
    random_masking,
    unpatchify,
)

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


pytestmark = pytest.mark.usefixtures("one_thread")


def data_info(channels: int = 3, size: tuple[int, int] = (32, 32)) -> dict[str, Any]:
    return {
        "dataset": {"channels": channels, "image_size": list(size), "num_classes": 10},
        "encoder": {
            "backbone": "convnet",
            "in_channels": channels,
            "small_images": True,
            "mean": [0.45] * channels,
            "std": [0.25] * channels,
        },
    }


@pytest.mark.parametrize("patches, ratio, keep", [(64, 0.75, 16), (49, 0.75, 12), (16, 0.5, 8)])
def test_masking_splits_every_patch_exactly_once(patches: int, ratio: float, keep: int) -> None:
    visible, restore, mask = random_masking(6, patches, ratio, torch.Generator().manual_seed(1))
    assert visible.shape == (6, keep) and restore.shape == mask.shape == (6, patches)
    for b in range(6):
        hidden = torch.nonzero(mask[b]).flatten()
        assert len(hidden) == patches - keep and len(set(visible[b].tolist())) == keep
        assert sorted(visible[b].tolist() + hidden.tolist()) == list(range(patches))
    assert len({tuple(v.tolist()) for v in visible}) == 6  # each image its own draw
    # `restore` puts [visible tokens, then hidden ones] back in patch order.
    ids = torch.arange(patches).float().expand(6, -1)[..., None]
    placed = torch.cat([_gather_tokens(ids, visible), -torch.ones(6, patches - keep, 1)], dim=1)
    expected = torch.where(mask.bool(), -1.0, torch.arange(patches).float())
    assert torch.equal(_gather_tokens(placed, restore)[..., 0], expected)
    # The same generator seed gives the same split (resumed runs mask the same way).
    again = random_masking(6, patches, ratio, torch.Generator().manual_seed(1))[0]
    assert torch.equal(again, visible)


def test_patchify_layout_and_inverse() -> None:
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    for n in range(6):
        r, c = divmod(n, 3)
        block = x[1, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]  # C×p×p
        assert torch.equal(patches[1, n], block.permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, 4, 3, (2, 3)), x)


def test_per_patch_target_normalisation_by_hand() -> None:
    patches = torch.rand(3, 5, 12)
    normalised = patch_targets(patches, normalise=True)
    arr = patches.numpy().astype(np.float64)
    for b in range(3):
        for n in range(5):
            p = arr[b, n]
            expected = (p - p.mean()) / np.sqrt(p.var(ddof=1) + 1e-6)
            np.testing.assert_allclose(normalised[b, n].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(patch_targets(patches, normalise=False), patches)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_is_mse_on_hidden_patches_and_encoder_sees_only_visible(norm_pix_loss: bool) -> None:
    torch.manual_seed(0)
    options = dict(method="mae", patch_size=4, norm_pix_loss=norm_pix_loss)
    model = MAE.create(data_info(size=(16, 16)), **options)
    assert model.encoder.config["backbone"] == "vit-mini" and model.config.backbone == "vit-mini"
    lengths: list[int] = []
    model.vit.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    loss, features = model.pretext_loss(x, -torch.ones(4), torch.Generator().manual_seed(3))
    assert lengths == [4] and features.shape == (4, 192)  # 16 patches, 25% visible

    prediction, targets, mask, _ = model.forward_mae(x, torch.Generator().manual_seed(3))
    pixels = patchify(x.float() / 255, 4)
    if norm_pix_loss:
        pixels = (pixels - pixels.mean(-1, keepdim=True)) / (
            pixels.var(-1, keepdim=True) + 1e-6
        ).sqrt()
    torch.testing.assert_close(targets, pixels)
    errors = [
        ((prediction[b, n] - targets[b, n]) ** 2).mean()
        for b in range(4)
        for n in range(16)
        if mask[b, n] == 1
    ]
    assert len(errors) == 4 * 12
    torch.testing.assert_close(loss, torch.stack(errors).mean())


def test_exported_encoder_is_the_vit_on_all_patches_mean_pooled() -> None:
    torch.manual_seed(0)
    model = MAE.create(data_info(), method="mae", backbone="vit-mini", patch_size=8)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    normalised = (x.float() / 255 - 0.45) / 0.25
    tokens = model.vit.norm(model.vit.blocks(model.vit.embed(normalised)))
    assert tokens.shape == (3, 16, 192)
    torch.testing.assert_close(model.encoder(x), tokens.mean(dim=1))


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_loss_decreases_below_the_patch_mean_on_a_real_cifar_batch() -> None:
    x = torch.from_numpy(np.load(CIFAR / "test.npz")["x"][:32]).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(0)
    model = MAE.create(data_info(), method="mae", patch_size=8, decoder_dim=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(20):  # a new random mask every step
        loss, _ = model.pretext_loss(x, -torch.ones(32), torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Predicting each hidden patch's own mean (0 for normalised targets) scores (n-1)/n = 0.995
    # for n = 8·8·3 pixels; the model must do better than that, not only fix its output scale.
    # Measured: 1.60 at the first step, 0.95 over the last three.
    assert np.mean(losses[:3]) > 1.1 and np.mean(losses[-3:]) < 0.97, losses


@pytest.mark.parametrize(
    "options, message",
    [
        ({"patch_size": 3}, r"--patch-size 3 does not divide the 8×8 images"),
        ({"backbone": "resnet18"}, r"--backbone resnet18: mae needs a ViT"),
        ({"mask_ratio": 1.0}, r"--mask-ratio must be between 0 and 1"),
        ({"patch_size": 8}, r"--mask-ratio 0.75 leaves no visible patch of the 1"),
    ],
)
def test_bad_input_is_one_line_before_the_run_directory(
    tmp_path: Path, options: dict, message: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SelfsupError, match=message) as error:
        selfsup.pretrain(
            method="mae", data="digits", limit=64, batch_size=32, out=str(out), **options
        )
    assert "\n" not in str(error.value)
    assert not out.exists()
