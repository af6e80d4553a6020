"""What a new user meets pretraining images: progress and cost on stderr, the slow phases named,
a `next:` hint for an unlabeled folder, and the README's plain-PyTorch recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import selfsup
from selfsup.cli.main import main
from selfsup.image import train
from selfsup.image.use.export import export

pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).parents[1] / "README.md"
RECIPE_MARKER = "<!-- recipe: plain-pytorch-safetensors -->"


def test_pretrain_prints_images_per_second_and_the_eta_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train.ProgressLines, "every", 0.0)  # a line after every step
    argv = ["pretrain", "simclr", "--data", "digits", "--limit", "128", "--batch-size", "32"]
    assert main([*argv, "--epochs", "2", "--no-online-probe", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "images/s" in line]
    first = (
        r"epoch 1/2  step 1/8  \d+ images/s  ETA \d+ s \(about \d+ s per epoch at 8×8 px on cpu\)"
    )
    assert re.fullmatch(first, lines[0]), err
    assert re.fullmatch(r"epoch 2/2  step 8/8  \d+ images/s  ETA 0 s", lines[-1]), err
    assert len(lines) == 8


def _pngs(folder: Path, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_unlabeled_folder_run_names_its_slow_phases_and_a_next_step_with_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    _pngs(photos, 8, 140, seed=0)
    monkeypatch.setattr(train.SlowPhase, "after", 0.0)  # as if decoding took a while
    monkeypatch.setenv("SELFSUP_REPORT", "1")
    monkeypatch.setattr("selfsup.reporting.write_run_report", lambda run: None)
    run = tmp_path / "run"
    argv = ["pretrain", "simclr", "--data", f"folder:{photos}", "--batch-size", "4"]
    assert main([*argv, "--epochs", "1", "--out", str(run)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == f"loading --data folder:{photos} (decoding and resizing its images) ..."
    assert re.fullmatch(r"loaded 8 training images of 140×140 px in \d+ s", err[1]), err
    assert "on cpu; --image-size 96 would take about " in err[2], err  # the cost, and the cure
    assert err[-1].startswith(f"writing the report {run / 'report.html'}"), err
    hint = captured.out.strip().splitlines()[-1]
    assert hint.startswith(f"next: selfsup evaluate {run} --data folder:LABELED ("), hint
    assert f"selfsup select {run} --budget 50" in hint


def _recipe(path: Path, size: int) -> str:
    """The README's plain-PyTorch block, reading `path`, on images of the run's size."""
    readme = README.read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index(RECIPE_MARKER)) + len("```python\n")
    code = readme[start : readme.index("```", start)]
    assert "runs/photos/export/encoder.safetensors" in code and "channels, 32, 32)" in code
    code = code.replace("runs/photos/export/encoder.safetensors", str(path))
    return code.replace("channels, 32, 32)", f"channels, {size}, {size})")


@pytest.mark.parametrize(
    "options",
    [
        {"method": "simclr"},  # the default backbone, convnet
        {"method": "simclr", "backbone": "convnet-wide"},
        {"method": "autoencoder", "linear_autoencoder": True, "code_dim": 16},
    ],
    ids=["convnet", "convnet-wide", "linear"],  # resnets: tests/test_export.py runs it too
)
def test_the_readme_recipe_rebuilds_every_backbone_without_selfsup(
    tmp_path: Path, options: dict
) -> None:
    quick = {"data": "digits", "limit": 64, "batch_size": 32, "epochs": 1, "report": False}
    run = selfsup.pretrain(**quick, **options, online_probe=False, out=str(tmp_path / "run"))
    path = export(run, format="safetensors")
    namespace: dict = {}
    exec(_recipe(path, 8), namespace)  # noqa: S102 (the README's own code)
    with torch.no_grad():
        expected = selfsup.load(run)(namespace["images"])
        torch.testing.assert_close(namespace["features"], expected, atol=1e-5, rtol=1e-4)


def test_the_readme_recipe_names_the_exports_to_use_for_a_vit(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    config = {"backbone": "vit-mini", "in_channels": 3, "small_images": True}
    save_file({"mean": torch.zeros(1)}, str(path), metadata={"selfsup_encoder": json.dumps(config)})
    with pytest.raises(ValueError, match="vit-mini: use the ONNX or TorchScript export"):
        exec(_recipe(path, 32), {})  # noqa: S102
