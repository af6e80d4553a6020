"""`--backbone timm:NAME` and `torchvision:NAME`: the library's own model as a feature extractor
(checked against the library's own pooled features on the same weights), trained, exported and
rebuilt through the public path; one line for a missing timm or a bad name."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import selfsup
from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.image.models import Encoder

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
STATS = dict(mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])


def _encoder(name: str, **kw: object) -> Encoder:
    return Encoder(name, 3, small_images=True, image_size=[32, 32], **STATS, **kw).eval()


def _images(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def _normalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in STATS.values())
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto", "efficientnet_b0"])
def test_timm_cnn_features_are_timms_own_pooled_features(arch: str) -> None:
    timm = pytest.importorskip("timm")
    encoder = _encoder(f"timm:{arch}")
    reference = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    reference.load_state_dict(encoder.backbone.model.state_dict())  # the same weights
    x = _images()
    with torch.no_grad():
        got = encoder(x)
        pooled = reference.forward_head(reference.forward_features(_normalised(x)), True)
    assert encoder.feature_dim == reference.num_features == got.shape[1]
    torch.testing.assert_close(got, pooled, atol=1e-5, rtol=1e-5)


def test_timm_vit_is_built_for_the_image_size_and_exposes_its_patch_tokens() -> None:
    timm = pytest.importorskip("timm")
    encoder = _encoder("timm:vit_tiny_patch16_224", patch_size=4)
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4
    ).eval()
    reference.load_state_dict(encoder.backbone.model.state_dict())
    x, vit = _images(), encoder.backbone
    with torch.no_grad():
        tokens = reference.forward_features(_normalised(x))
        torch.testing.assert_close(encoder(x), reference(_normalised(x)), atol=1e-5, rtol=1e-5)
        # what MAE runs: positions on the patch tokens, then class token, blocks and norm
        encoded = vit.encode(vit.embed(_normalised(x)))
    assert (vit.patch_size, vit.grid, vit.dim, encoder.feature_dim) == (4, (8, 8), 192, 192)
    torch.testing.assert_close(encoded, tokens[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(SelfsupError, match="built for 32×32 images, got 16×16"):
        encoder(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("arch", "head"), [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")]
)
def test_torchvision_features_are_what_its_classifier_reads(arch: str, head: str) -> None:
    from torchvision.models import get_model

    encoder = _encoder(f"torchvision:{arch}")
    reference = get_model(arch, weights=None).eval()
    missing, unexpected = reference.load_state_dict(encoder.backbone.model.state_dict(), False)
    assert not unexpected and {k.rsplit(".", 1)[0] for k in missing} == {head}
    seen: list[torch.Tensor] = []
    reference.get_submodule(head).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        got = encoder(_images())
        reference(_normalised(_images()))
    assert encoder.feature_dim == got.shape[1] == reference.get_submodule(head).in_features
    torch.testing.assert_close(got, seen[0], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cifar4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CIFAR.is_dir():
        pytest.skip("needs ../shared/data/cifar10")
    path = tmp_path_factory.mktemp("cifar") / "four.npz"
    np.savez(path, x=np.load(CIFAR / "test.npz")["x"][:4])  # unlabeled: one batch, one step
    return path


def _pretrain(method: str, backbone: str, data: Path, out: Path) -> Path:
    argv = ["pretrain", method, "--data", f"npz:{data}", "--backbone", backbone]
    assert main([*argv, "--batch-size", "4", "--epochs", "1", "--out", str(out)]) == 0
    return out


def _check_exports(run: Path, tmp: Path) -> None:
    """ONNX, TorchScript and safetensors give the loaded run's features (1e-5)."""
    x = _images(3).float() / 255  # a batch size the export never saw
    with torch.no_grad():
        expected = selfsup.load(run)(x)
    pt, st = tmp / "enc.pt", tmp / "enc.safetensors"
    assert main(["export", str(run), "--format", "torchscript", "-o", str(pt)]) == 0
    assert main(["export", str(run), "--format", "safetensors", "-o", str(st)]) == 0
    with safe_open(str(st), "pt") as f:
        rebuilt = Encoder(**json.loads(f.metadata()["selfsup_encoder"])).eval()
        rebuilt.load_state_dict({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(pt))(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rebuilt(x), expected, atol=1e-5, rtol=1e-5)
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = tmp / "enc.onnx"
    assert main(["export", str(run), "--format", "onnx", "-o", str(onnx)]) == 0
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() < 1e-5


def test_simclr_step_on_a_timm_resnet_exports_the_same_features(
    cifar4: Path, tmp_path: Path
) -> None:
    pytest.importorskip("timm")
    run = _pretrain("simclr", "timm:resnet18", cifar4, tmp_path / "run")
    config = selfsup.load(run).config
    assert config["backbone"] == "timm:resnet18" and config["image_size"] == [32, 32]
    _check_exports(run, tmp_path)


def test_mae_step_on_a_timm_vit_exports_the_same_features(cifar4: Path, tmp_path: Path) -> None:
    pytest.importorskip("timm")
    run = _pretrain("mae", "timm:vit_tiny_patch16_224", cifar4, tmp_path / "run")
    assert selfsup.load(run).backbone.patch_size == 4  # MAE's --patch-size, not the name's 16
    _check_exports(run, tmp_path)


def test_torchvision_run_classifies_and_predicts(cifar4: Path, tmp_path: Path) -> None:
    run = _pretrain("simclr", "torchvision:mobilenet_v3_small", cifar4, tmp_path / "run")
    labels = tmp_path / "labels.csv"
    labels.write_text("index,label\n0,0\n1,1\n2,0\n3,1\n")
    model = tmp_path / "m.classifier"
    assert main(["classify", str(run), "--labels", str(labels), "--out", str(model)]) == 0
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i, image in enumerate(np.load(cifar4)["x"]):
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(model), f"folder:{tmp_path / 'images'}", "-o", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 4


def test_without_timm_one_line_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(
        SelfsupError, match=r"timm:resnet18 needs timm: pip install 'selfsup\[timm\]'"
    ):
        selfsup.pretrain(backbone="timm:resnet18", out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_bad_names_and_unfit_methods_are_one_line(cifar4: Path, tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="no classification model 'resnet19'; did you mean "):
        selfsup.pretrain(backbone="torchvision:resnet19", out=str(tmp_path / "a"))
    with pytest.raises(SelfsupError, match="expected one of .*timm:NAME or torchvision:NAME"):
        selfsup.pretrain(backbone="keras:resnet18", out=str(tmp_path / "b"))
    with pytest.raises(SelfsupError, match="mae needs a ViT, .* or a timm ViT"):
        selfsup.pretrain(method="mae", backbone="torchvision:vit_b_16", out=str(tmp_path / "c"))
    with pytest.raises(SelfsupError, match="colorization needs one of selfsup's convolutional"):
        selfsup.pretrain(
            method="colorization",
            backbone="torchvision:resnet18",
            data=f"npz:{cifar4}",
            batch_size=4,
            out=str(tmp_path / "d"),
        )


def test_bad_timm_names_and_models_are_one_line(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    with pytest.raises(SelfsupError, match="no model 'resnet19'; did you mean timm:resnet18"):
        selfsup.pretrain(backbone="timm:resnet19", out=str(tmp_path / "a"))
    with pytest.raises(SelfsupError, match="mae needs a ViT's patch tokens"):
        selfsup.pretrain(
            method="mae", backbone="timm:resnet18", limit=64, batch_size=8, out=str(tmp_path / "b")
        )
