"""`--init-weights FILE`: a timm or torchvision state dict, or a selfsup run's exported encoder,
loaded into the backbone before pretraining (checked against the library's own features on the
same file); one line for keys or shapes that do not fit and for files that are not weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

import selfsup
from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.image.methods import get_method

pytestmark = pytest.mark.usefixtures("one_thread")

STATS = dict(mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])


def _info(backbone: str, small: bool = False) -> dict:
    """What train.py hands a method: the data's shape and the encoder's settings."""
    dataset = dict(channels=3, image_size=[32, 32], num_classes=0, classes=None, train_size=4)
    encoder = dict(backbone=backbone, in_channels=3, small_images=small, **STATS)
    if ":" in backbone:
        encoder["image_size"] = [32, 32]
    return {"dataset": dataset, "encoder": encoder}


def _encoder(backbone: str, init: Path, small: bool = False, **kw: object) -> nn.Module:
    """The encoder of a SimCLR run started from `init`, built as pretrain builds it."""
    method = get_method("simclr").create(
        _info(backbone, small), backbone=backbone, init_weights=str(init), **kw
    )
    return method.encoder.eval()


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 32, 32), generator=g).to(torch.uint8)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """x as the encoder feeds its conv backbone: normalised, in channels_last memory."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in STATS.values())
    return ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def _torchvision_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(1)
    return resnet18(weights=None).eval().to(memory_format=torch.channels_last)  # with its fc


def test_timm_safetensors_gives_timms_own_features(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False).eval()  # fc head included
    reference.to(memory_format=torch.channels_last)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    x = _images()
    with torch.no_grad():
        got = _encoder("timm:resnet18", path)(x)
        want = reference.forward_head(reference.forward_features(_normalised(x)), True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", ["torchvision:resnet18", "resnet18"])
def test_torchvision_weights_only_file_gives_torchvisions_features(
    backbone: str, tmp_path: Path
) -> None:
    reference = _torchvision_resnet18()
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    reference.fc = nn.Identity()
    x = _images()
    with torch.no_grad():
        got = _encoder(backbone, path)(x)
        want = reference(_normalised(x))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_unfit_keys_are_one_line_unless_partial(tmp_path: Path) -> None:
    reference = _torchvision_resnet18()
    state = reference.state_dict()
    del state["layer4.1.conv2.weight"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "unfit.pt"
    torch.save(state, path)
    with pytest.raises(SelfsupError) as e:
        _encoder("torchvision:resnet18", path)
    message = str(e.value)
    assert "\n" not in message and "--init-weights-partial" in message
    assert "missing 1: model.layer4.1.conv2.weight; unexpected 1: extra.weight" in message
    assert "fc." not in message  # the classifier head is dropped, not reported
    backbone = _encoder("torchvision:resnet18", path, init_weights_partial=True).backbone.model
    torch.testing.assert_close(backbone.conv1.weight, state["conv1.weight"])
    assert not torch.equal(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # a shape that differs: one line naming the key, partial or not (CIFAR stem: 3×3 conv1)
    with pytest.raises(SelfsupError, match=r"^--init-weights \S+: conv1.weight has shape"):
        _encoder("resnet18", path, small=True, init_weights_partial=True)


def test_files_that_are_not_weights_are_one_line_and_leave_no_folder(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole module: needs unpickling its class
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = [
        (pickled, "holds pickled objects beyond tensors, which selfsup never unpickles"),
        (corrupt, "not a readable safetensors file"),
        (tmp_path / "absent.pt", "no such file"),
    ]
    for path, expected in cases:
        out = tmp_path / f"run-{path.stem}"
        with pytest.raises(SelfsupError, match=expected) as e:
            selfsup.pretrain(init_weights=str(path), out=str(out))
        assert "\n" not in str(e.value) and not out.exists()
    with pytest.raises(SelfsupError, match="--init-weights-partial needs --init-weights"):
        selfsup.pretrain(init_weights_partial=True, out=str(tmp_path / "run"))


def test_selfsup_encoder_round_trips_and_resume_keeps_the_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "four.npz"
    g = np.random.default_rng(0)
    np.savez(data, x=g.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    base = ["pretrain", "simclr", "--data", f"npz:{data}", "--batch-size", "4"]
    first = tmp_path / "first"
    assert main([*base, "--epochs", "1", "--out", str(first)]) == 0
    exported = tmp_path / "encoder.safetensors"
    assert main(["export", str(first), "--format", "safetensors", "-o", str(exported)]) == 0
    saved = selfsup.load(first)
    # a new run's encoder on the same data starts as the exported one
    info = _info("convnet", small=True)
    info["encoder"].update(mean=saved.config["mean"], std=saved.config["std"])
    method = get_method("simclr").create(info, init_weights=str(exported))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(method.encoder.eval()(x), saved(x), atol=1e-6, rtol=1e-6)
    # through the command line: recorded in config.yaml; --resume continues from the checkpoint
    second = tmp_path / "second"
    argv = [*base, "--init-weights", str(exported), "--out", str(second)]
    assert main([*argv, "--epochs", "1"]) == 0
    config = yaml.safe_load((second / "config.yaml").read_text())
    assert config["init_weights"] == str(exported)
    exported.unlink()  # a reload would fail: --resume continues from the checkpoint alone
    assert main(["pretrain", "--resume", str(second), "--epochs", "2"]) == 0
    assert yaml.safe_load((second / "config.yaml").read_text())["init_weights"] == str(exported)


def test_help_names_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "simclr", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--init-weights" in text and "--init-weights-partial" in text
    assert "(fc., head., classifier.) is dropped" in text
