"""Pretraining end to end on digits: it learns, resumes exactly, and faults keep checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import selfsup
from selfsup.core.errors import SelfsupError
from selfsup.image.methods.simclr import SimCLR
from selfsup.image.use.samples import load_method

QUICK = dict(data="digits", limit=512, batch_size=128, epochs=2, backbone="convnet")


def test_simclr_probe_beats_random_init_on_digits(digits_run: Path) -> None:
    run = digits_run
    # 2% of the labels (3 per class): where pretraining matters most. Measured on 2026-11-29:
    # 86.9% against 75.1% for the random-init encoder (at 10% labels the gap is only ~4 points).
    results = selfsup.evaluate(run, fractions="0.02", seeds=3, baselines="random", kmeans=False)
    accuracy = {
        method: np.mean([r["accuracy"] for r in results["few_label"] if r["method"] == method])
        for method in ("selfsup", "random")
    }
    assert accuracy["selfsup"] > accuracy["random"] + 0.06, accuracy


def test_run_directory_holds_everything(tmp_path: Path) -> None:
    run = selfsup.pretrain(method="simclr", out=str(tmp_path / "run"), **QUICK)
    for name in [
        "config.yaml",
        "command.txt",
        "metrics.csv",
        "encoder.safetensors",
        "checkpoints/last.ckpt",
        "samples/epoch000.png",
        "samples/epoch001.png",
    ]:
        assert (run / name).is_file(), name
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2 * (512 // 128)
    assert (run / "config.yaml").stat().st_mode & 0o044 == 0o044  # readable like any file
    with open(run / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "train/loss" in columns and "test/probe_acc" in columns

    encoder = selfsup.load(run)
    exported = load_file(run / "encoder.safetensors")
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, exported[name])
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert encoder(x).shape == (4, encoder.feature_dim)

    features, labels = selfsup.embed(run, split="test")
    assert features.shape == (360, encoder.feature_dim) and labels.shape == (360,)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = selfsup.pretrain(method="simclr", out=str(tmp_path / "straight"), **QUICK)
    halted = selfsup.pretrain(
        method="simclr", out=str(tmp_path / "halted"), **{**QUICK, "epochs": 1}
    )
    resumed = selfsup.pretrain(resume=str(halted), epochs=2)
    assert resumed == halted
    commands = (resumed / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and "resume=" in commands[1]
    a = load_file(straight / "encoder.safetensors")
    b = load_file(resumed / "encoder.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    checkpoint = torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 * (512 // 128)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SimCLR.pretext_loss

    def poisoned(self, x, y, g):
        loss, features = original(self, x, y, g)
        return (loss * float("nan") if self.current_epoch == 1 else loss), features

    monkeypatch.setattr(SimCLR, "pretext_loss", poisoned)
    with pytest.raises(SelfsupError, match=r"loss became nan at step 4 \(epoch 1\).*last good"):
        selfsup.pretrain(method="simclr", out=str(tmp_path / "run"), **QUICK)
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backbone": "vgg"}, "--backbone 'vgg' is unknown"),
        ({"optimizer": "rmsprop"}, "--optimizer 'rmsprop' is unknown"),
        ({"recipe": "wild"}, "--recipe 'wild' is unknown"),
        ({"data": "imagenet-1k"}, "imagenet-1k"),
        ({"limit": 100, "batch_size": 256}, "fewer than one batch"),
        ({"temperature": 0.0}, "--temperature must be positive"),
        ({"crop_size": 2}, "--crop-size must be at least 4"),
        ({"crop_size": 16, "backbone": "vit-mini"}, "position embeddings"),
    ],
)
def test_bad_options_give_one_line_and_write_nothing(
    tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(SelfsupError, match=message) as info:
        selfsup.pretrain(method="simclr", out=str(tmp_path / "run"), **{**QUICK, **options})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(SelfsupError, match="already exists"):
        selfsup.pretrain(method="simclr", out=str(tmp_path / "run"), **QUICK)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resume_without_checkpoint_is_explained(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="does not exist"):
        selfsup.pretrain(resume=str(tmp_path / "nowhere"))


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="needs ../shared/data/mnist")
def test_transfer_evaluation_on_another_dataset_with_finetuning(tmp_path: Path) -> None:
    run = selfsup.pretrain(method="simclr", out=str(tmp_path / "run"), **QUICK)
    results = selfsup.evaluate(
        run,
        data=f"npz:{SHARED_DATA / 'mnist' / 'test.npz'}",
        limit=600,
        fractions="1.0",
        seeds=1,
        baselines="raw",
        finetune="last-1",
        supervised_steps=100,
        kmeans=True,
    )
    # MNIST's 28×28 images are resized to the encoder's 8×8; no test split -> 20% of the
    # 10,000 images held out (before --limit, which then keeps 600 of each part).
    assert (results["train_size"], results["test_size"]) == (600, 600)
    methods = {row["method"] for row in results["few_label"]}
    assert methods == {"selfsup", "raw", "finetune (last-1)"}
    assert all(0.3 < row["accuracy"] <= 1 for row in results["few_label"])
    assert 0 < results["kmeans"]["nmi"] <= 1
    assert (Path(results["out"]) / "embeddings.png").is_file()


def test_pretrain_on_an_unlabeled_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = selfsup.pretrain(
        method="simclr",
        data=f"folder:{folder}",
        image_size=16,
        batch_size=16,
        epochs=1,
        out=str(tmp_path / "run"),
    )
    encoder = selfsup.load(run)
    assert encoder.config["in_channels"] == 3
    features, labels = selfsup.embed(run)
    assert features.shape == (40, encoder.feature_dim) and labels is None


@pytest.mark.parametrize("name", ["simclr", "vicreg"])
def test_views_smaller_than_the_images(name: str, tmp_path: Path) -> None:
    run = selfsup.pretrain(method=name, crop_size=6, out=str(tmp_path / "run"), **QUICK)
    method, _, _ = load_method(run)  # the saved config rebuilds the 6-pixel views
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    assert method.views(images, torch.Generator().manual_seed(0)).shape == (3, 1, 6, 6)
    if name != "simclr":
        return
    with pytest.raises(SelfsupError, match="crop_size is not an option of rotation"):
        selfsup.pretrain(method="rotation", crop_size=6, out=str(tmp_path / "rot"), **QUICK)
    assert not (tmp_path / "rot").exists()


def test_the_wide_convnet_trains_and_reloads_with_1024_features(tmp_path: Path) -> None:
    options = {**QUICK, "backbone": "convnet-wide", "epochs": 1}
    run = selfsup.pretrain(method="simclr", out=str(tmp_path / "run"), **options)
    encoder = selfsup.load(run)  # rebuilt from config.yaml, weights from encoder.safetensors
    assert encoder.feature_dim == 1024
    features, _ = selfsup.embed(run, limit=20)
    assert features.shape == (20, 1024) and np.isfinite(features).all()


def test_a_methods_own_option_error_leaves_no_run_directory(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="--code-dim 100"):
        selfsup.pretrain(
            method="autoencoder",
            linear_autoencoder=True,
            code_dim=100,
            out=str(tmp_path / "run"),
            **QUICK,
        )
    assert not (tmp_path / "run").exists()


def test_two_processes_share_one_run_directory(tmp_path: Path) -> None:
    """--devices 2 on the CPU: Lightning re-runs the command for rank 1, which must join the run
    directory rank 0 chose (here the default, time-stamped one) instead of refusing it."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "selfsup", "pretrain", "simclr", "--data", "digits"]
    cmd += ["--epochs", "1", "--batch-size", "64", "--accelerator", "cpu", "--devices", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    assert done.stdout.count("next: selfsup evaluate") == 1  # one summary, from the first process
    assert (runs[0] / "encoder.safetensors").is_file()
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    # each rank takes half of the 1437 training digits: 719 // 64 = 11 steps, not 1437 // 64 = 22
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 11
