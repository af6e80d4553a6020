"""`selfsup export`: the encoder runs without selfsup and gives the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import selfsup
from selfsup.cli import main
from selfsup.models import Encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    argv = ["pretrain", "simclr", "--data", "digits", "--limit", "256", "--batch-size", "64"]
    assert main([*argv, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _images() -> torch.Tensor:
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_onnx_in_onnxruntime_matches_the_torch_encoder(run: Path, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "enc.onnx"
    assert main(["export", str(run), "--format", "onnx", "-o", str(path)]) == 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _images()  # a batch size the export never saw
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        expected = selfsup.load(run)(x).numpy()
    assert got.shape == expected.shape == (5, selfsup.load(run).feature_dim)
    assert abs(got - expected).max() < 1e-4


def test_torchscript_loads_with_plain_torch(run: Path, tmp_path: Path) -> None:
    path = tmp_path / "enc.pt"
    assert main(["export", str(run), "--format", "torchscript", "-o", str(path)]) == 0
    scripted = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(scripted(_images()), selfsup.load(run)(_images()))


def test_safetensors_carries_the_architecture(run: Path, tmp_path: Path) -> None:
    path = tmp_path / "enc.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "-o", str(path)]) == 0
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["selfsup_encoder"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    rebuilt = Encoder(**config).eval()
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(_images()), selfsup.load(run)(_images()))


def test_bad_export_requests_are_one_line(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(run), "--format", "tflite"]) == 2
    assert main(["export", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("selfsup: error:") for line in err)
