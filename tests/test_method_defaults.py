"""A method's own defaults fill only what the user left unset; the test split stays out of
pretraining and out of every choice."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import selfsup
from selfsup.core.errors import SelfsupError
from selfsup.image.augment import build_recipe
from selfsup.image.config import PretrainConfig
from selfsup.image.data import load_splits
from selfsup.image.methods import get_method

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = dict(data="digits", limit=256, batch_size=64, epochs=1)


@pytest.mark.parametrize(
    ("method", "recipe", "backbone"),
    [
        ("simclr", "simclr", "convnet"),
        ("colorization", "light", "convnet"),
        ("clip", "light", "convnet"),
        ("mae", "none", "vit-mini"),
        ("inpainting", "none", "convnet"),
    ],
)
def test_each_method_fills_only_unset_options(method: str, recipe: str, backbone: str) -> None:
    defaults = get_method(method).with_defaults(PretrainConfig(method=method))
    assert (defaults.recipe, defaults.backbone) == (recipe, backbone)
    if recipe != "none":  # an explicit choice is kept, even when it equals another default
        chosen = PretrainConfig(method=method, recipe="crop", backbone="resnet18")
        kept = get_method(method).with_defaults(chosen)
        assert (kept.recipe, kept.backbone) == ("crop", "resnet18")


def test_colorization_keeps_an_explicit_simclr_recipe(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (80, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=rgb)
    options = dict(QUICK, data=f"npz:{tmp_path / 'rgb.npz'}", batch_size=32)
    run = selfsup.pretrain(
        method="colorization", recipe="simclr", out=str(tmp_path / "r"), **options
    )
    assert yaml.safe_load((run / "config.yaml").read_text())["recipe"] == "simclr"


def test_mae_refuses_a_convnet_and_a_recipe_it_would_ignore(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="--backbone convnet: mae needs a ViT"):
        selfsup.pretrain(method="mae", backbone="convnet", out=str(tmp_path / "a"), **QUICK)
    with pytest.raises(SelfsupError, match="--recipe simclr: mae draws no augmented views"):
        selfsup.pretrain(method="mae", recipe="simclr", out=str(tmp_path / "b"), **QUICK)
    assert not any(tmp_path.iterdir())


def test_clips_default_views_keep_colour() -> None:
    """Captions name colours ("a red car"): CLIP's default views must not change them."""
    config = get_method("clip").with_defaults(PretrainConfig(method="clip"))
    red = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    red[:, 0] = 200
    red[:, 1] = 30
    g = torch.Generator().manual_seed(0)
    views = build_recipe(config.recipe, (16, 16), 3)(red, g)
    views = views.float() * (255 if views.is_floating_point() and views.max() <= 1 else 1)
    torch.testing.assert_close(
        views.mean(dim=(2, 3)), red.float().mean(dim=(2, 3)), atol=1.0, rtol=0
    )
    # ...where SimCLR's views do change colours (the reason CLIP has its own default).
    simclr = build_recipe("simclr", (16, 16), 3)(red, torch.Generator().manual_seed(0)).float()
    simclr = simclr * (255 if simclr.max() <= 1 else 1)
    assert (simclr.mean(dim=(2, 3)) - red.float().mean(dim=(2, 3))).abs().max() > 20


def _indexed_images(n: int) -> np.ndarray:
    """Images whose pixels spell their own index (to find where each image went)."""
    x = np.zeros((n, 4, 4, 1), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
    return x


def _ids(images: torch.Tensor) -> set[int]:
    return set((images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist())


def test_a_source_without_test_split_holds_one_out_before_pretraining(tmp_path: Path) -> None:
    n = 500
    y = np.repeat(np.arange(5), n // 5)
    np.savez(tmp_path / "train.npz", x=_indexed_images(n), y=y)
    spec = f"npz:{tmp_path / 'train.npz'}"
    train, test = load_splits(spec)
    assert test is not None and test.held_out and len(test) == n // 5
    assert _ids(train.x) | _ids(test.x) == set(range(n)) and not _ids(train.x) & _ids(test.x)
    assert np.bincount(test.y.numpy()).tolist() == [20] * 5  # stratified
    limited, test_again = load_splits(spec, limit=100)  # --limit shrinks train, not test
    assert _ids(test_again.x) == _ids(test.x) and _ids(limited.x) <= _ids(train.x)

    seen: set[int] = set()
    step = get_method("simclr").pretext_loss

    def recording(self, x, labels, g):
        seen.update(_ids(x.cpu()))
        return step(self, x, labels, g)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(get_method("simclr"), "pretext_loss", recording)
        run = selfsup.pretrain(
            method="simclr", data=spec, batch_size=50, epochs=1, out=str(tmp_path / "run")
        )
    assert seen and not seen & _ids(test.x)  # pretraining never saw a held-out image
    dataset = yaml.safe_load((run / "config.yaml").read_text())["dataset"]
    assert dataset["train_size"] == 400 and dataset["test_split"].startswith("held out")
    features, labels = selfsup.embed(run, split="test")
    assert len(features) == 100 and labels.tolist() == test.y.tolist()


def test_the_online_probe_is_logged_as_a_test_metric_and_selects_nothing(tmp_path: Path) -> None:
    run = selfsup.pretrain(method="simclr", out=str(tmp_path / "run"), **QUICK)
    with open(run / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "test/probe_acc" in columns and not any(c.startswith("val/") for c in columns)
    from selfsup.image.train import _trainer

    config = PretrainConfig(method="simclr", **QUICK)
    train, _ = load_splits("digits", limit=256)
    from selfsup.image.train import ResumeHint

    trainer = _trainer(config, tmp_path / "t", train, None, ResumeHint(tmp_path / "t", ""))
    assert trainer.checkpoint_callback.monitor is None  # keeps the last epoch, chooses nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sync_batchnorm_is_refused_on_cpu_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="--sync-batchnorm needs CUDA") as info:
        selfsup.pretrain(method="simclr", sync_batchnorm=True, out=str(tmp_path / "r"), **QUICK)
    assert "\n" not in str(info.value) and not (tmp_path / "r").exists()
