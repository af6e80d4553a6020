"""Tests for the batched augmentation ops, recipes and preview figures."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from selfsup.core.errors import SelfsupError
from selfsup.image.augment import (
    RECIPES,
    Augment,
    augment_preview,
    build_recipe,
    color_jitter,
    cutout,
    gaussian_blur,
    gaussian_noise,
    grayscale,
    horizontal_flip,
    random_resized_crop,
    rotation,
    sobel,
    view_grid,
)

# name -> op called with p=1 (always applied) where the op has p
ALWAYS = {
    "crop": lambda x, g: random_resized_crop(x, g, (12, 10)),
    "flip": lambda x, g: horizontal_flip(x, g, p=1.0),
    "jitter": lambda x, g: color_jitter(x, g, 0.4, 0.4, 0.4, 0.1, p=1.0),
    "gray": lambda x, g: grayscale(x, g, p=1.0),
    "rotation": lambda x, g: rotation(x, g, p=1.0),
    "cutout": lambda x, g: cutout(x, g, 0.5, p=1.0),
    "noise": lambda x, g: gaussian_noise(x, g, 0.1, p=1.0),
    "blur": lambda x, g: gaussian_blur(x, g, (0.5, 2.0), p=1.0, kernel_frac=0.5),
    "sobel": lambda x, g: sobel(x, g),
}
NEVER = {
    "flip": lambda x, g: horizontal_flip(x, g, p=0.0),
    "jitter": lambda x, g: color_jitter(x, g, 0.4, 0.4, 0.4, 0.1, p=0.0),
    "gray": lambda x, g: grayscale(x, g, p=0.0),
    "rotation": lambda x, g: rotation(x, g, p=0.0),
    "cutout": lambda x, g: cutout(x, g, 0.5, p=0.0),
    "noise": lambda x, g: gaussian_noise(x, g, 0.1, p=0.0),
    "blur": lambda x, g: gaussian_blur(x, g, p=0.0),
}
RANDOM = ["crop", "jitter", "rotation", "cutout", "noise", "blur"]  # params vary per sample


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 16, c: int = 3, h: int = 12, w: int = 12) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=gen(123))


@pytest.mark.parametrize("name", list(ALWAYS))
@pytest.mark.parametrize("channels", [1, 3])
def test_op_shape_dtype_range_and_seed(name: str, channels: int) -> None:
    x = images(c=channels)
    before = x.clone()
    out = ALWAYS[name](x, gen(1))
    assert torch.equal(x, before)  # the input is not modified
    shape = (16, channels, 12, 10) if name == "crop" else x.shape
    assert out.shape == shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, ALWAYS[name](x, gen(1)))


@pytest.mark.parametrize("name", RANDOM)
def test_op_draws_parameters_per_sample(name: str) -> None:
    x = images(b=1).expand(16, -1, -1, -1).contiguous()  # 16 copies of one image
    out = ALWAYS[name](x, gen(2))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) >= 3
    assert not torch.equal(out, ALWAYS[name](x, gen(3)))


@pytest.mark.parametrize("op", [horizontal_flip, grayscale])
def test_coin_is_per_sample(op) -> None:
    x = images(b=1).expand(64, -1, -1, -1).contiguous()
    applied = (op(x, gen(4), p=0.5) != x).flatten(1).any(1)
    assert 10 < int(applied.sum()) < 54


@pytest.mark.parametrize("name", list(NEVER))
def test_p0_is_identity(name: str) -> None:
    x = images()
    assert torch.allclose(NEVER[name](x, gen()), x, atol=1e-6)


def test_flip_twice_is_identity() -> None:
    x = images()
    once = horizontal_flip(x, gen(), p=1.0)
    assert torch.equal(once, x.flip(-1))
    assert torch.equal(horizontal_flip(once, gen(), p=1.0), x)


def test_crop_full_box_is_identity_and_constant_stays_constant() -> None:
    x = images()
    same = random_resized_crop(x, gen(), (12, 12), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    const = random_resized_crop(torch.full((4, 1, 9, 9), 0.3), gen(), 5)
    assert const.shape == (4, 1, 5, 5) and torch.allclose(const, torch.full_like(const, 0.3))


def test_rotation_is_one_of_four_rot90s() -> None:
    x = images(b=1).expand(64, -1, -1, -1).contiguous()
    out = rotation(x, gen(5), p=1.0)
    rots = [torch.rot90(x[0], k, dims=(1, 2)) for k in range(4)]
    ks = [next(k for k in range(4) if torch.equal(o, rots[k])) for o in out]
    assert set(ks) == {0, 1, 2, 3}


def test_rotation_of_non_square_is_0_or_180() -> None:
    x = images(b=1, h=6, w=10).expand(32, -1, -1, -1).contiguous()
    out = rotation(x, gen(6), p=1.0)
    assert out.shape == x.shape
    flipped = torch.rot90(x[0], 2, dims=(1, 2))
    is_rot = [torch.equal(o, x[0]) or torch.equal(o, flipped) for o in out]
    assert all(is_rot) and any(torch.equal(o, flipped) for o in out)


def test_grayscale_is_luminance_in_every_channel() -> None:
    x = images()
    out = grayscale(x, gen(), p=1.0)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(out[:, c], luma, atol=1e-6)


def test_jitter_brightness_scales_each_sample_by_one_factor() -> None:
    x = images() * 0.5  # no clipping at 1.4×
    out = color_jitter(x, gen(), brightness=0.4, contrast=0, saturation=0, hue=0, p=1.0)
    factor = (out.sum((1, 2, 3)) / x.sum((1, 2, 3))).view(-1, 1, 1, 1)
    assert torch.allclose(out, x * factor, atol=1e-5)
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5 and factor.std() > 0.05


def test_jitter_hue_keeps_luma_and_gray() -> None:
    x = 0.4 + 0.2 * images()  # mid-range colours: no clipping
    out = color_jitter(x, gen(), brightness=0, contrast=0, saturation=0, hue=0.5, p=1.0)
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((out * w).sum(1), (x * w).sum(1), atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)
    gray = x[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(color_jitter(gray, gen(), 0, 0, 0.4, 0.5, p=1.0), gray, atol=1e-5)


def test_jitter_one_channel_uses_brightness_and_contrast() -> None:
    x = images(c=1)
    out = color_jitter(x, gen(), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.0)
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_noise_std() -> None:
    x = torch.full((8, 3, 32, 32), 0.5)
    out = gaussian_noise(x, gen(), std=0.1, p=1.0)
    assert abs((out - x).std().item() - 0.1) < 0.005 and abs((out - x).mean().item()) < 0.005


def test_blur_reduces_variance_and_tiny_sigma_is_identity() -> None:
    x = images(h=32, w=32)
    blurred = gaussian_blur(x, gen(), sigma=(1.0, 2.0), p=1.0)
    assert (blurred.var((2, 3)) < 0.5 * x.var((2, 3))).all()
    assert torch.allclose(gaussian_blur(x, gen(), sigma=(1e-3, 1e-3), p=1.0), x, atol=1e-6)
    const = torch.full((2, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(const, gen(), p=1.0), const, atol=1e-6)


def test_sobel_constant_and_vertical_edge() -> None:
    assert sobel(torch.full((2, 3, 8, 8), 0.6)).abs().max() == 0
    x = torch.zeros(2, 3, 8, 8)
    x[..., 4:] = 1.0  # vertical edge between columns 3 and 4
    out = sobel(x)
    assert out.shape == x.shape and out.max() == 1
    assert (out[..., 3:5] > 0).all() and (out[..., :3] == 0).all() and (out[..., 5:] == 0).all()
    assert torch.equal(out[:, 0], out[:, 2])


def test_cutout_area_matches_clipped_square() -> None:
    h = w = 10
    side = 5  # round(0.5 * 10), top-left at centre - 2
    x = torch.ones(2000, 1, h, w)
    zeros = (cutout(x, gen(), size_frac=0.5, p=1.0) == 0).flatten(1).sum(1).float()
    span = [min(c - 2 + side, h) - max(c - 2, 0) for c in range(h)]  # clipped length per centre
    expected = (sum(span) / h) ** 2  # rows and columns independent
    assert zeros.max() == side * side and zeros.min() > 0
    assert abs(zeros.mean().item() - expected) < 0.03 * expected
    assert abs((cutout(x, gen(), p=0.5) == 0).flatten(1).any(1).float().mean() - 0.5) < 0.05


def test_recipe_accepts_uint8_and_matches_float() -> None:
    x8 = (images() * 255).to(torch.uint8)
    aug = build_recipe("simclr", (12, 12), 3)
    out = aug(x8, gen(7))
    assert out.dtype == torch.float32 and out.shape == x8.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, aug(x8.float() / 255, gen(7)))


def test_simclr_one_channel_and_blur_only_for_large_images() -> None:
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    assert build_recipe("simclr", (8, 8), 1)(x, gen()).shape == (8, 1, 8, 8)
    assert "blur" not in [n for n, _ in build_recipe("simclr", (32, 32), 3).steps]
    assert "blur" in [n for n, _ in build_recipe("simclr", (64, 64), 3).steps]


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_runs(name: str) -> None:
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = build_recipe(name, (16, 16), 3)(x, gen())
    assert out.shape == (4, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_light_recipe_keeps_at_least_half_the_image() -> None:
    # a horizontal ramp: the value span of a crop measures its width; area >= 50% and aspect
    # <= 4/3 give width >= sqrt(0.5 * 3/4) = 61% of the image (vs 8% area for the crop recipe)
    x = (torch.arange(20.0) / 19).expand(64, 1, 20, 20)

    def span(out: torch.Tensor) -> torch.Tensor:
        return out.amax((1, 2, 3)) - out.amin((1, 2, 3))

    assert span(build_recipe("light", (20, 20), 1)(x, gen())).min() > 0.55
    assert span(build_recipe("crop", (20, 20), 1)(x, gen())).min() < 0.5
    assert torch.equal(build_recipe("none", (20, 20), 1)(x, gen()), x)


def test_unknown_names_raise() -> None:
    with pytest.raises(SelfsupError, match="simclr"):
        build_recipe("nope", (8, 8), 3)
    with pytest.raises(SelfsupError, match="crop"):
        Augment([("crop", {"size": 8}), ("twirl", {})])


def test_composed_augment() -> None:
    aug = Augment([("crop", {"size": (6, 6)}), ("flip", {"p": 1.0})])
    assert aug(images(), gen()).shape == (16, 3, 6, 6)


@pytest.fixture
def photo(tmp_path):
    y, x = torch.meshgrid(torch.arange(60), torch.arange(90), indexing="ij")
    rgb = torch.stack([x * 2, y * 4, (x + y) % 256], -1).to(torch.uint8).numpy()
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    return path


def test_augment_preview_writes_png(photo, tmp_path) -> None:
    out = augment_preview(photo, tmp_path / "sub" / "preview.png", size=48, seed=1)
    assert out == tmp_path / "sub" / "preview.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height > 100


def test_augment_preview_bad_files(tmp_path) -> None:
    with pytest.raises(SelfsupError, match="missing.png"):
        augment_preview(tmp_path / "missing.png", tmp_path / "out.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(SelfsupError, match="corrupt.jpg"):
        augment_preview(corrupt, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_view_grid_writes_png(tmp_path) -> None:
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    aug = build_recipe("simclr", (8, 8), 1)
    out = view_grid(x, [aug(x, gen(0)), aug(x, gen(1))], tmp_path / "samples" / "views.png", n=3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.height > im.width
