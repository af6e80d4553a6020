"""One-pass commands on a folder (`embed`, `select`) decode its images as they go: the features
equal the encoder applied to the files read with PIL, and no image tensor of the folder is held."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import selfsup
from selfsup.cli.main import main
from selfsup.image.data import load_splits
from selfsup.image.runs import dataset_for


def test_embed_and_select_stream_a_folder(digits_run: Path, tmp_path: Path) -> None:
    _, test = load_splits("digits")
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(test.x[i][0].numpy()).save(folder / f"{i:02d}.png")
    spec = f"folder:{folder}"
    assert dataset_for(digits_run, spec, stream=True).x is None  # decoded on demand
    features, _ = selfsup.embed(digits_run, spec)
    files = sorted(folder.glob("*.png"))
    pixels = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    with torch.inference_mode():
        expected = selfsup.load(digits_run).eval()(torch.from_numpy(pixels)[:, None]).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-4, rtol=1e-4)

    out = tmp_path / "picks.csv"
    argv = ["select", str(digits_run), "--data", spec, "--budget", "5", "-o", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and all(Path(r["path"]).parent == folder for r in rows)
