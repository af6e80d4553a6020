"""`selfsup export`: the encoder runs without selfsup and gives the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import selfsup
from selfsup.cli.main import main
from selfsup.image.models import Encoder

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
    props = {p.key: p.value for p in pytest.importorskip("onnx").load(str(path)).metadata_props}
    assert json.loads(props["selfsup_pixels"])["scale"] == 255.0  # digits: uint8


def test_torchscript_loads_with_plain_torch(run: Path, tmp_path: Path) -> None:
    path = tmp_path / "enc.pt"
    assert main(["export", str(run), "--format", "torchscript", "-o", str(path)]) == 0
    extra = {"selfsup_pixels.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        torch.testing.assert_close(scripted(_images()), selfsup.load(run)(_images()))
    assert json.loads(extra["selfsup_pixels.json"])["scale"] == 255.0  # digits: uint8


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


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("export") / "resnet"
    argv = ["pretrain", "simclr", "--data", "digits", "--backbone", "resnet18", "--limit", "64"]
    assert main([*argv, "--batch-size", "32", "--epochs", "1", "--out", str(out)]) == 0
    path = out / "encoder-export.safetensors"
    assert main(["export", str(out), "--format", "safetensors", "-o", str(path)]) == 0
    return out, path


def _readme_rebuild_block() -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python", readme.index("<!-- recipe: plain-pytorch-safetensors"))
    return readme[start + len("```python") : readme.index("```", start + 9)]


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_the_readme_rebuilds_a_resnet_without_selfsup(resnet_export, library: str) -> None:
    run, path = resnet_export
    code = _readme_rebuild_block().replace("runs/photos/export/encoder.safetensors", str(path))
    if library == "timm":  # the README's one-line change for timm
        pytest.importorskip("timm")
        readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
        timm_line = "net = timm.create_model(" + readme.split("`net = timm.create_model(")[1]
        timm_line = timm_line.split("`", 1)[0]
        torchvision_line = "net = getattr(torchvision.models, name)(weights=None)"
        assert torchvision_line in code
        code = "import timm\n" + code.replace(torchvision_line, timm_line)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 (the README's own code)
    with torch.no_grad():
        expected = selfsup.load(run).eval()(namespace["images"])
        torch.testing.assert_close(namespace["features"], expected, atol=1e-5, rtol=1e-4)
    assert namespace["features"].shape == (4, 512)
