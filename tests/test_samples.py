"""`selfsup samples RUN` redraws a run's sample grid from its checkpoint, as training drew it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import selfsup
from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.image.use.samples import regenerate_samples

TINY = dict(data="digits", limit=64, batch_size=32, epochs=1, online_probe=False)
RUNS = {
    "mae": dict(method="mae", patch_size=2, decoder_dim=32),
    "inpainting": dict(method="inpainting", mask="random", mask_blocks=2),
    "inpainting-l2": dict(method="inpainting", adv=0.0),
    "autoencoder": dict(method="autoencoder", code_dim=8),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    yield {name: selfsup.pretrain(out=str(root / name), **TINY, **o) for name, o in RUNS.items()}
    torch.set_num_threads(threads)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("name", list(RUNS))
def test_regenerated_grid_matches_the_one_training_drew(runs: dict[str, Path], name: str) -> None:
    run = runs[name]
    path = regenerate_samples(run)
    assert path == run / "samples/regenerated/epoch000.png"
    assert np.array_equal(pixels(path), pixels(run / "samples/epoch000.png"))


def test_cli_best_checkpoint_output_and_beside(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["inpainting"]
    out = tmp_path / "grid.png"
    assert main(["samples", str(run), "--checkpoint", "best", "-o", str(out)]) == 0
    assert np.array_equal(pixels(out), pixels(run / "samples/epoch000.png"))
    # The lecture's figure: an L2-only run's paintings as an extra row on the same holes.
    both = tmp_path / "both.png"
    assert main(["samples", str(run), "--beside", str(runs["inpainting-l2"]), "-o", str(both)]) == 0
    assert pixels(both).shape[0] > pixels(out).shape[0]  # one more row


def test_bad_input_is_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = runs["mae"]
    assert main(["samples", str(run), "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint" in err and "no such file" in err
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SelfsupError, match="not a readable checkpoint"):
        regenerate_samples(run, checkpoint=str(broken))
    with pytest.raises(SelfsupError, match="does not fit the mae model"):
        regenerate_samples(run, checkpoint=str(runs["autoencoder"] / "checkpoints/last.ckpt"))
    with pytest.raises(SelfsupError, match="name a .png file"):
        regenerate_samples(run, out=tmp_path / "grid.jpg")
    with pytest.raises(SelfsupError, match="--beside draws inpainting runs"):
        regenerate_samples(runs["inpainting"], beside=[run])
    with pytest.raises(SelfsupError, match="not a selfsup run directory"):
        regenerate_samples(tmp_path)
