import pytest
import torch

from selfsup.core.errors import SelfsupError
from selfsup.image.models import BACKBONES, Encoder, ProjectionHead, build_backbone
from selfsup.image.models.vit import VIT_SIZES

CIFAR = dict(mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])


def _encoder(name: str, channels: int, small: bool = True) -> Encoder:
    stats = CIFAR if channels == 3 else dict(mean=[0.5], std=[0.3])
    return Encoder(name, channels, small_images=small, **stats)


@pytest.mark.parametrize(("name", "width"), [("convnet", 256), ("convnet-wide", 1024)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 32, 96])
def test_convnet_shapes(name, width, channels, size):
    net, dim = build_backbone(name, channels, small_images=size < 64)
    assert dim == width
    assert net(torch.rand(3, channels, size, size)).shape == (3, width)
    widths = [block[-3].out_channels for block in net.blocks]  # conv, BN, ReLU end each block
    assert widths == [32, 64, 128, width]


@pytest.mark.parametrize(("size", "expected"), [(8, [8, 4, 2, 2]), (32, [32, 16, 8, 4])])
def test_convnet_never_downsamples_below_two_pixels(size, expected):
    enc = _encoder("convnet", 1)
    x, sizes = torch.rand(2, 1, size, size), []
    for block in enc.blocks():
        x = block(x)
        sizes.append(x.shape[-1])
    assert sizes == expected


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("channels", [1, 3])
def test_resnet_shapes_small_stem(name, dim, channels):
    net, d = build_backbone(name, channels, small_images=True)
    assert d == dim and net.conv1.in_channels == channels
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.rand(2, channels, 32, 32)).shape == (2, dim)


def test_resnet_imagenet_stem_with_one_channel():
    net, dim = build_backbone("resnet18", 1, small_images=False)
    assert net.conv1.kernel_size == (7, 7) and net.conv1.in_channels == 1
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, dim)


def test_unknown_backbone_lists_names():
    with pytest.raises(SelfsupError, match="convnet, convnet-wide, resnet18, resnet50") as err:
        build_backbone("vit", 3, small_images=True)
    assert "\n" not in str(err.value)
    convnets = {"convnet", "convnet-wide"}
    assert set(BACKBONES) == {*convnets, "resnet18", "resnet50", *VIT_SIZES}  # ViTs: mae only


def test_encoder_uint8_and_float_inputs_agree():
    torch.manual_seed(0)
    enc = _encoder("convnet", 3).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = enc(x)
    assert out.shape == (4, enc.feature_dim) == (4, 256)
    torch.testing.assert_close(out, enc(x.float() / 255))
    torch.testing.assert_close(out, enc(x.float().div(255).to(memory_format=torch.channels_last)))


def test_encoder_normalises_per_channel():
    enc = _encoder("convnet", 3).eval()
    x = torch.tensor(CIFAR["mean"]).view(1, 3, 1, 1).expand(2, 3, 8, 8)  # the mean image
    torch.testing.assert_close(enc(x), enc.backbone(torch.zeros(2, 3, 8, 8)))


def test_encoder_rejects_wrong_number_of_stats():
    with pytest.raises(SelfsupError, match="mean/std"):
        Encoder("convnet", 1, small_images=True, **CIFAR)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_encoder_rebuilds_from_config(name):
    enc = _encoder(name, 1).eval()
    clone = Encoder(**enc.config).eval()
    state, clone_state = enc.state_dict(), clone.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in clone_state.items()}
    clone.load_state_dict(state)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(clone(x), enc(x))


@pytest.mark.parametrize(("name", "n_blocks"), [("convnet", 4), ("resnet18", 5), ("resnet50", 5)])
def test_blocks_cover_all_backbone_parameters(name, n_blocks):
    enc = _encoder(name, 3, small=False)
    blocks = enc.blocks()
    assert len(blocks) == n_blocks
    block_params = [p for b in blocks for p in b.parameters()]
    backbone_params = list(enc.backbone.parameters())
    assert sum(p.numel() for p in block_params) == sum(p.numel() for p in backbone_params)
    assert {id(p) for p in block_params} == {id(p) for p in backbone_params}


def test_projection_head():
    head = ProjectionHead(256, 512, 64)
    assert head(torch.randn(5, 256)).shape == (5, 64)
    linears = [m for m in ProjectionHead(32, 16, 8, num_layers=3) if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 16), (16, 16), (16, 8)]
    assert isinstance(ProjectionHead(32, out_dim=8, num_layers=1), torch.nn.Sequential)
    assert len(ProjectionHead(32, out_dim=8, num_layers=1)) == 1
