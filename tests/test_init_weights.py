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


def _encoder(
    backbone: str,
    init: Path | None,
    small: bool = False,
    patch_size: int | None = None,
    **kw: object,
) -> nn.Module:
    """The encoder of a SimCLR run started from `init`, built as pretrain builds it."""
    info = _info(backbone, small)
    if patch_size:
        info["encoder"]["patch_size"] = patch_size
    init_weights = str(init) if init else None
    method = get_method("simclr").create(info, backbone=backbone, init_weights=init_weights, **kw)
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


def _hf_vit_config(**kw: object) -> dict:
    """transformers ViT/DINOv2 settings of timm's vit_tiny shape (192 wide, 3 heads) on 32-px
    images in 4-px patches, timm's LayerNorm eps."""
    return dict(
        hidden_size=192,
        num_attention_heads=3,
        image_size=32,
        patch_size=4,
        layer_norm_eps=1e-6,
        **kw,
    )


@pytest.mark.parametrize("classifier", [False, True])
def test_hf_vit_safetensors_gives_transformers_own_cls_features(
    classifier: bool, tmp_path: Path
) -> None:
    pytest.importorskip("timm")
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(2)
    config = ViTConfig(**_hf_vit_config(num_hidden_layers=12, intermediate_size=768))
    model = (ViTForImageClassification(config) if classifier else ViTModel(config)).eval()
    model.save_pretrained(tmp_path)  # model.safetensors, the Hub's key names
    encoder = _encoder("timm:vit_tiny_patch16_224", tmp_path / "model.safetensors", patch_size=4)
    x = _images()
    with torch.no_grad():
        got = encoder(x)
        vit = model.vit if classifier else model
        want = vit(pixel_values=_normalised(x).contiguous()).last_hidden_state[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "swiglu", "registers"])
def test_hf_dinov2_safetensors_gives_transformers_own_features(kind: str, tmp_path: Path) -> None:
    """Layer scale, SwiGLU, register tokens; the model built for 32-px images from a file of
    16-px positions (resampled as transformers resamples them when it runs on 32 px)."""
    pytest.importorskip("timm")
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    from selfsup.image.models.external import TimmViT
    from selfsup.image.models.init_weights import load_init_weights

    torch.manual_seed(3)
    settings = dict(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        mlp_ratio=4,
        image_size=16,
        patch_size=4,
        layerscale_value=0.5,
    )
    timm_kw: dict = dict(init_values=1e-5)
    if kind == "registers":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**settings))
        timm_kw.update(reg_tokens=4, no_embed_class=True)
    else:
        model = Dinov2Model(Dinov2Config(**settings, use_swiglu_ffn=kind == "swiglu"))
    if kind == "swiglu":  # transformers' hidden width: 2/3 of 4x, rounded up to a multiple of 8
        hidden = (int(32 * 4 * 2 / 3) + 7) // 8 * 8
        timm_kw.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2 * hidden / 32)
    model.eval().save_pretrained(tmp_path)
    vit = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        **{"mlp_ratio": 4, **timm_kw},
    )
    backbone = TimmViT("timm:dinov2-like", vit, (32, 32)).eval()
    load_init_weights(backbone, tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(pixel_values=x).pooler_output  # the CLS token after the final norm
        torch.testing.assert_close(backbone(x), want, atol=1e-5, rtol=1e-5)


def test_timm_hub_file_with_a_prefix_loads_and_unfit_keys_are_one_line(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    reference = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "model.safetensors"
    state = {f"module.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path))
    x = _images()
    with torch.no_grad():
        want = reference.forward_head(reference.forward_features(_normalised(x)), True)
        torch.testing.assert_close(_encoder("timm:resnet18", path)(x), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(SelfsupError, match="does not fit --backbone timm:resnet34") as e:
        _encoder("timm:resnet34", path)
    assert "\n" not in str(e.value) and "missing" in str(e.value)


def _offline_timm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE with an empty cache: the Hub refuses without touching the network."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_pretrained_offline_is_one_line_naming_the_weights_and_init_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("timm")
    _offline_timm(monkeypatch, tmp_path)
    with pytest.raises(SelfsupError) as e:
        _encoder("timm:resnet18", None, pretrained=True)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("--pretrained: could not fetch timm's weights for resnet18 from ")
    assert "hf-hub:timm/resnet18" in message and "HF_HUB_OFFLINE" in message
    assert "--init-weights FILE instead" in message


def _no_download(monkeypatch: pytest.MonkeyPatch, state: dict | None) -> list[str]:
    """torchvision's download replaced: `state` returned, or no network (URLError)."""
    import urllib.error

    import torchvision.models._api as api

    urls: list[str] = []

    def fetch(url: str, *args: object, **kw: object) -> dict:
        urls.append(url)
        if state is None:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return state

    monkeypatch.setattr(api, "load_state_dict_from_url", fetch)
    return urls


def test_torchvision_pretrained_loads_the_named_weights_and_offline_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    reference = _torchvision_resnet18()
    urls = _no_download(monkeypatch, reference.state_dict())
    encoder = _encoder("torchvision:resnet18.IMAGENET1K_V1", None, pretrained=True)
    reference.fc = nn.Identity()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference(_normalised(x)), atol=1e-6, rtol=1e-6)
    assert urls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    _no_download(monkeypatch, None)
    with pytest.raises(SelfsupError) as e:
        _encoder("torchvision:resnet18", None, pretrained=True)
    assert "\n" not in str(e.value) and "could not fetch torchvision's weights for resnet18" in str(
        e.value
    )
    with pytest.raises(SelfsupError, match="has no weights 'V9'; expected one of IMAGENET1K_V1"):
        _encoder("torchvision:resnet18.V9", None, pretrained=True)


def test_pretrained_is_refused_in_one_line_where_it_cannot_apply_and_dropped_on_resume(
    tmp_path: Path,
) -> None:
    from selfsup.image.train import config_from_saved

    for options, expected in [
        (dict(backbone="convnet"), "--pretrained needs --backbone timm:NAME or torchvision:NAME"),
        (
            dict(backbone="torchvision:resnet18", init_weights=str(tmp_path / "w.pt")),
            "--pretrained and --init-weights both choose the starting weights",
        ),
    ]:
        torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
        out = tmp_path / "run"
        with pytest.raises(SelfsupError, match=expected):
            selfsup.pretrain(pretrained=True, out=str(out), **options)
        assert not out.exists()
    saved = dict(method="simclr", backbone="torchvision:resnet18", pretrained=True)
    assert config_from_saved(saved).pretrained is False  # its weights are in the checkpoint


def test_hf_vit_into_selfsups_own_vit_refused_in_one_line_or_blocks_loaded(
    tmp_path: Path,
) -> None:
    """selfsup's vit-* has no class token and fixed sin-cos positions: a transformers ViT file is
    refused in one line naming them; partial loads the rest, which then computes what
    transformers' own patch embedding, layers and final norm compute (1e-5)."""
    from transformers import ViTConfig, ViTModel

    from selfsup.image.models.init_weights import load_init_weights
    from selfsup.image.models.vit import ViT

    torch.manual_seed(3)
    config = ViTConfig(
        **_hf_vit_config(num_hidden_layers=2, intermediate_size=768) | dict(image_size=8)
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    vit = ViT(3, [8, 8], 4, 192, 2, 3).eval()
    with pytest.raises(
        SelfsupError, match=r"class token and learned position .*cls_token, pos_emb"
    ):
        load_init_weights(vit, file, what="--backbone vit-mini")
    with pytest.raises(SelfsupError) as caught:
        load_init_weights(vit, file)
    assert "\n" not in str(caught.value)
    load_init_weights(vit, file, partial=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        patches = model.embeddings.patch_embeddings(x)  # B×N×D
        torch.testing.assert_close(vit.embed(x) - vit.positions, patches, atol=1e-5, rtol=1e-5)
        # transformers' own layers on selfsup's tokens (its patches + sin-cos positions)
        hidden = patches + vit.positions
        for layer in model.layers:
            hidden = layer(hidden)
        want = model.layernorm(hidden).mean(dim=1)
        torch.testing.assert_close(vit(x), want, atol=1e-5, rtol=1e-5)
