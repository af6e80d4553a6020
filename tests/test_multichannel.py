"""Images beyond RGB bytes: 6-channel uint16 data through pretrain, evaluate, embed and export;
per-channel statistics; RGB-only augmentations skipped; 16-bit PNG and TIFF stacks read exactly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import selfsup
from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.image.augment.recipes import RECIPES, build_recipe
from selfsup.image.data import batch_loader, load_splits, sources
from selfsup.image.data.multichannel import (
    StackImages,
    channel_stats,
    is_stack,
    read_image,
    to_unit,
)
from selfsup.image.models.encoder import Encoder
from selfsup.image.use.export import export

BANDS, SIDE = 6, 12


def _spectral(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images N×H×W×6 of 12-bit values in uint16; class c is brightest in bands c and c + 3."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 1500, (n, SIDE, SIDE, BANDS))
    for c in range(3):
        x[y == c, :, :, c] += 2500
        x[y == c, :, :, c + 3] += 2000
    return x.astype(np.uint16), y.astype(np.int64)


@pytest.fixture
def spectral(tmp_path: Path) -> Path:
    root = tmp_path / "spectral"
    root.mkdir()
    for name, n, seed in (("train", 96, 0), ("test", 48, 1)):
        x, y = _spectral(n, seed)
        np.savez(root / f"{name}.npz", x=x, y=y, classes=np.array(["water", "crop", "forest"]))
    return root


def test_six_band_uint16_through_pretrain_evaluate_embed_export(spectral, tmp_path) -> None:
    train_x, _ = _spectral(96, 0)
    with pytest.warns(UserWarning, match="color-jitter, color-drop skipped"):
        run = selfsup.pretrain(
            method="simclr",
            data=f"npz:{spectral}",
            backbone="convnet",
            epochs=1,
            batch_size=32,
            out=str(tmp_path / "run"),
        )
    encoder = rundir.read_config(run)["encoder"]
    assert encoder["in_channels"] == BANDS
    # per-channel statistics on the [0, 1] scale, raw / 65535, computed here in float64
    unit = train_x.astype(np.float64) / 65535
    np.testing.assert_allclose(encoder["mean"], unit.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(encoder["std"], unit.std(axis=(0, 1, 2), ddof=1), rtol=1e-4)

    for probe in ("linear", "knn"):
        results = selfsup.evaluate(
            run, fractions="1.0", seeds=1, baselines="raw", kmeans=False, probe=probe
        )
        accuracy = {r["method"]: r["accuracy"] for r in results["few_label"]}
        assert accuracy["raw"] > 0.9 and accuracy["selfsup"] > 0.6, (probe, accuracy)

    features, labels = selfsup.embed(run, split="test")
    assert features.shape[0] == 48 and np.isfinite(features).all()

    path = export(run, format="safetensors")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["selfsup_encoder"])
    assert config["in_channels"] == BANDS
    assert config["mean"] == encoder["mean"] and config["std"] == encoder["std"]
    # the exported encoder on raw / 65535 float images gives embed's features
    rebuilt = Encoder(**config)
    rebuilt.load_state_dict(load_file(str(path)))
    test_x, _ = _spectral(48, 1)
    pixels = torch.from_numpy(test_x.astype(np.float32) / 65535).permute(0, 3, 1, 2)
    with torch.no_grad():
        ours = rebuilt.eval()(pixels).numpy()
    np.testing.assert_allclose(ours, features, rtol=1e-4, atol=1e-5)


def test_channel_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((7, 5, 4, 3)).astype(np.float32)  # N×C×H×W
    mean, std = channel_stats(torch.from_numpy(x))
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, x.astype(np.float64).std(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    b = rng.integers(0, 256, (4, 2, 3, 3), dtype=np.uint8)
    mean, _ = channel_stats(torch.from_numpy(b))
    np.testing.assert_allclose(mean, (b / 255).mean(axis=(0, 2, 3)), rtol=1e-5)
    flat = channel_stats(torch.full((2, 1, 3, 3), 0.5))[1]
    assert flat == [pytest.approx(1e-3)]  # a constant channel: the floor, never 0


def test_rgb_only_ops_skipped_for_six_channels_applied_for_three() -> None:
    g = torch.Generator().manual_seed(0)
    six = torch.rand(4, 6, 8, 8)
    with pytest.warns(UserWarning, match="color-drop skipped.*6 channels"):
        drop6 = build_recipe("color-drop", (8, 8), 6)
    assert torch.equal(drop6(six, g), six)  # nothing left to do
    rgb = torch.rand(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note for RGB
        out = build_recipe("color-drop", (8, 8), 3)(rgb, g)
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), rgb.numpy(), axes=([0], [1]))
    np.testing.assert_allclose(out.numpy(), np.repeat(luma[:, None], 3, axis=1), atol=1e-6)
    # SimCLR's recipe: geometric ops stay for any channel count, colour ops only for RGB
    with pytest.warns(UserWarning, match="applied: crop, flip, blur"):
        names6 = [name for name, _ in build_recipe("simclr", (64, 64), 6).steps]
    names3 = [name for name, _ in build_recipe("simclr", (64, 64), 3).steps]
    assert names6 == ["crop", "flip", "blur"]
    assert names3 == [name for name, _ in RECIPES["simclr"]((64, 64), 3)]
    assert build_recipe("simclr", (64, 64), 6)(torch.rand(2, 6, 64, 64), g).shape[1] == 6


def test_uint16_png_and_tiff_stack_read_back_exactly(tmp_path) -> None:
    rng = np.random.default_rng(0)
    png = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
    Image.fromarray(png).save(tmp_path / "band.png")
    back = read_image(tmp_path / "band.png")
    assert back.dtype == np.uint16 and np.array_equal(back[..., 0], png)
    # to [0, 1] and back: exact
    unit = to_unit(back, "band.png")
    assert unit.dtype == torch.float32
    assert np.array_equal(np.round(unit.numpy().astype(np.float64) * 65535).astype(np.uint16), back)
    stack = rng.integers(0, 65536, (BANDS, 9, 7), dtype=np.uint16)
    pages = [Image.fromarray(band) for band in stack]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert np.array_equal(read_image(tmp_path / "stack.tif"), stack.transpose(1, 2, 0))
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").shape == (5, 6, 3)
    assert np.array_equal(read_image(tmp_path / "rgba.png", keep_alpha=True), rgba)


def test_float_and_int16_npz_pixels(tmp_path) -> None:
    x = np.random.default_rng(0).random((10, 6, 6, 4)).astype(np.float32)
    np.savez(tmp_path / "float.npz", x=x)
    train, _ = load_splits(f"npz:{tmp_path / 'float.npz'}", image_size=4)
    assert train.x.dtype == torch.float32 and train.x.shape == (10, 4, 4, 4)  # resized, float
    train, _ = load_splits(f"npz:{tmp_path / 'float.npz'}")
    assert torch.equal(train.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    np.savez(tmp_path / "ct.npz", x=np.array([[[-32768, 0], [32767, -1024]]], np.int16))
    train, _ = load_splits(f"npz:{tmp_path / 'ct.npz'}")
    expected = (np.array([[-32768, 0], [32767, -1024]]) + 32768) / 65535
    np.testing.assert_allclose(train.x[0, 0].numpy(), expected, rtol=1e-6)
    np.savez(tmp_path / "sar.npz", x=np.full((3, 4, 4, 2), -12.5, np.float32))
    with pytest.raises(SelfsupError, match=r"sar.npz: 'x': float pixels range over \[-12.5"):
        load_splits(f"npz:{tmp_path / 'sar.npz'}")


def test_stack_images_from_a_folder(tmp_path) -> None:
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 65536, (4, 8, 10), dtype=np.uint16)
    pages = [Image.fromarray(band) for band in stack]
    pages[0].save(tmp_path / "a.tiff", save_all=True, append_images=pages[1:])
    Image.fromarray(stack[0]).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c.png")
    assert [is_stack(tmp_path / n) for n in ("a.tiff", "b.png", "c.png")] == [True, True, False]
    ds = StackImages([str(tmp_path / "a.tiff")], [2], size=8)
    x, label = ds[0]
    assert label == 2 and x.shape == (4, 8, 8) and x.dtype == torch.float32
    expected = stack[:, :, 1:9].astype(np.float64) / 65535  # centre square, no resize
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6)


# ---- folders of TIFF stacks and 16-bit PNGs ------------------------------------------------


def _save_stack(path: Path, array: np.ndarray) -> None:
    """H×W×C uint16 -> a multi-page TIFF, one page a channel."""
    pages = [Image.fromarray(np.ascontiguousarray(array[..., c])) for c in range(array.shape[2])]
    pages[0].save(path, save_all=True, append_images=pages[1:])


def _stack_folder(root: Path) -> dict[str, np.ndarray]:
    """train/ and test/ with classes a, b, c of 6-band uint16 TIFFs (SIDE px square, so nothing
    is resized); returns each file's array by path."""
    written = {}
    for split, n, seed in (("train", 48, 2), ("test", 12, 3)):
        x, y = _spectral(n, seed)
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            folder = root / split / "abc"[label]
            folder.mkdir(parents=True, exist_ok=True)
            _save_stack(folder / f"{i:03d}.tif", image)
            written[str(folder / f"{i:03d}.tif")] = image
    return written


def _unit(array: np.ndarray) -> np.ndarray:
    """What a uint16 H×W×C file must load as: C×H×W float32 raw / 65535."""
    return (array.astype(np.float32) / np.float32(65535)).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], Path]:
    """(folder, each file's array by path, a SimCLR run pretrained on it): one pretraining for
    the tests of the folder, classify/predict and export."""
    root = tmp_path_factory.mktemp("tiffs")
    written = _stack_folder(root / "tiffs")
    with pytest.warns(UserWarning, match="color-jitter, color-drop skipped"):
        run = selfsup.pretrain(
            method="simclr",
            data=f"folder:{root / 'tiffs'}",
            backbone="convnet",
            epochs=1,
            batch_size=16,
            out=str(root / "run"),
        )
    return root / "tiffs", written, Path(run)


def test_folder_of_six_band_uint16_tiffs_loads_exactly_and_pretrains(tiffs, monkeypatch):
    folder, written, run = tiffs
    train, test = load_splits(f"folder:{folder}")
    assert train.x.dtype == torch.float32 and tuple(train.x.shape) == (48, BANDS, SIDE, SIDE)
    assert len(test) == 12 and train.classes == ["a", "b", "c"]
    for data in (train, test):
        for image, label, path in zip(data.x, data.y, data.paths, strict=True):
            assert np.array_equal(image.numpy(), _unit(written[path])), path
            assert data.classes[int(label)] == Path(path).parent.name
    monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 0)  # the lazy path: decoded when drawn
    lazy, _ = load_splits(f"folder:{folder}")
    assert lazy.x is None
    x, y = next(iter(batch_loader(lazy, 48, shuffle=False, drop_last=False)))
    assert torch.equal(x, train.x) and torch.equal(y, train.y)
    encoder = rundir.read_config(run)["encoder"]
    assert encoder["in_channels"] == BANDS
    unit = np.stack([_unit(written[p]) for p in train.paths]).astype(np.float64)
    np.testing.assert_allclose(encoder["mean"], unit.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_folder_of_16_bit_grey_pngs_loads_exactly(tmp_path) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "png").mkdir()
    written = {}
    for i in range(5):
        band = rng.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16)
        Image.fromarray(band).save(tmp_path / "png" / f"{i}.png")
        written[str(tmp_path / "png" / f"{i}.png")] = band[..., None]
    train, test = load_splits(f"folder:{tmp_path / 'png'}")
    assert test is None and train.x.dtype == torch.float32 and train.channels == 1
    for image, path in zip(train.x, train.paths, strict=True):
        assert np.array_equal(image.numpy(), _unit(written[path]))
    # resized: the float path, as `square_resize` does it on raw / 65535
    small, _ = load_splits(f"folder:{tmp_path / 'png'}", image_size=6)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(np.stack([_unit(written[p]) for p in train.paths])),
        size=(6, 6),
        mode="bilinear",
        antialias=True,
    ).clamp(0, 1)
    torch.testing.assert_close(small.x, expected, rtol=0, atol=1e-6)


def test_a_folder_of_mixed_kinds_is_one_line_naming_the_file(tmp_path) -> None:
    def folder(name: str, files: dict[str, np.ndarray]) -> str:
        (tmp_path / name).mkdir()
        for file, array in files.items():
            if file.endswith(".tif"):
                _save_stack(tmp_path / name / file, array)
            else:
                Image.fromarray(array).save(tmp_path / name / file)
        return f"folder:{tmp_path / name}"

    six = np.zeros((8, 8, 6), np.uint16)
    grey16, rgb = np.zeros((8, 8), np.uint16), np.zeros((8, 8, 3), np.uint8)
    cases = [
        (
            folder("bands", {"a.tif": six, "b.tif": six[..., :4]}),
            r"b\.tif: 4 channel.*a\.tif has 6",
        ),
        (
            folder("png16", {"a.png": grey16, "b.png": grey16.astype(np.uint8)}),
            r"b\.png: 1 .*uint8",
        ),
        (folder("rgb", {"a.png": rgb, "b.png": grey16}), r"b\.png: I;16 pixels.*a\.png has 8"),
        (folder("rgbtif", {"a.png": rgb, "b.tif": six}), r"b\.tif: a TIFF .*such as a\.png"),
    ]
    for spec, message in cases:
        with pytest.raises(SelfsupError, match=message) as caught:
            load_splits(spec)
        assert "\n" not in str(caught.value)


def test_evaluating_across_channel_counts_is_one_line() -> None:
    from selfsup.image.data import adapt_images

    for have, want in ((6, 3), (3, 6), (6, 1), (4, 6)):
        with pytest.raises(SelfsupError, match=rf"^images of {have} channel.* encoder of {want}:"):
            adapt_images(torch.rand(2, have, 4, 4), want, (4, 4))
    assert adapt_images(torch.rand(2, 6, 4, 4), 6, (2, 2)).shape == (2, 6, 2, 2)  # resize only
    with pytest.raises(ValueError, match="N×C×H×W"):
        adapt_images(torch.rand(6, 4, 4), 6, (4, 4))  # a caller's bug, not the user's


def test_classify_and_predict_on_six_band_uint16_tiffs(tiffs, tmp_path) -> None:
    import csv

    from selfsup.cli.main import main
    from selfsup.image.use.classify import Classifier

    folder, written, run = tiffs
    model = tmp_path / "bands.classifier"
    argv = ["classify", str(run), "--labels", f"folder:{folder / 'train'}", "--out", str(model)]
    assert main(argv) == 0
    out = tmp_path / "predictions.csv"
    argv = ["predict", str(model), f"folder:{folder / 'test'}", "-o", str(out)]
    assert main([*argv, "--batch-size", "5"]) == 0  # several batches
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12
    # the classifier on each file's pixels decoded here, raw / 65535 (pretraining's reading)
    pixels = torch.from_numpy(np.stack([_unit(written[r["path"]]) for r in rows]))
    expected = Classifier(model)(pixels).numpy()
    got = np.array([[float(r[f"p_{c}"]) for c in "abc"] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [r["label"] for r in rows] == ["abc"[int(i)] for i in expected.argmax(1)]
    accuracy = np.mean([r["label"] == Path(r["path"]).parent.name for r in rows])
    assert accuracy >= 0.75, accuracy  # the bands separate the classes (raw pixels: ~100%)


def _by_hand(path: Path, raw: np.ndarray) -> np.ndarray:
    """The backbone's features of raw pixels N×C×H×W fed as the export's `selfsup_pixels`
    says, in float64 numpy up to the backbone itself."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    rule, config = json.loads(meta["selfsup_pixels"]), json.loads(meta["selfsup_encoder"])
    mean, std = (np.asarray(rule[k], np.float64).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    x = ((raw.astype(np.float64) - rule["offset"]) / rule["scale"] - mean) / std
    encoder = Encoder(**config)
    encoder.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return encoder.eval().backbone(torch.from_numpy(x).float()).numpy()


def test_export_metadata_says_how_raw_pixels_feed_the_encoder(tiffs, digits_run) -> None:
    folder, written, run = tiffs
    path = export(run, format="safetensors")
    with safe_open(str(path), "pt") as f:
        rule = json.loads(f.metadata()["selfsup_pixels"])
    assert (rule["dtype"], rule["offset"], rule["scale"], rule["channels"]) == (
        "uint16",
        0.0,
        65535.0,
        BANDS,
    )
    features, _ = selfsup.embed(run, split="test")  # the pipeline: files decoded by selfsup
    _, test = load_splits(f"folder:{folder}")
    raw = np.stack([written[p].transpose(2, 0, 1) for p in test.paths])  # the files' uint16
    np.testing.assert_allclose(_by_hand(path, raw), features, rtol=1e-4, atol=1e-5)
    # 8-bit data: raw / 255
    path = export(digits_run, format="safetensors", out=Path(run) / "digits.safetensors")
    features, _ = selfsup.embed(digits_run, split="test")
    _, test = load_splits("digits")
    with safe_open(str(path), "pt") as f:
        rule = json.loads(f.metadata()["selfsup_pixels"])
    assert (rule["dtype"], rule["offset"], rule["scale"]) == ("uint8", 0.0, 255.0)
    np.testing.assert_allclose(_by_hand(path, test.x.numpy()), features, rtol=1e-4, atol=1e-5)


# ---- the pixel type: recorded at pretraining, carried by every export format -----------------

UINT16 = {"dtype": "uint16", "offset": 0.0, "scale": 65535.0}


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, Path]:
    """(the test split's uint8 RGB N×H×W×3, a SimCLR run pretrained on train.npz beside it)."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(5)
    for name, n in (("train", 64), ("test", 16)):
        x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        np.savez(root / f"{name}.npz", x=x, y=np.arange(n) % 2)
    run = selfsup.pretrain(
        method="simclr", data=f"npz:{root}", epochs=1, batch_size=32, out=str(root / "run")
    )
    return np.load(root / "test.npz")["x"], Path(run)


def _exported_pixels(path: Path, format: str) -> dict:
    """The `selfsup_pixels` JSON of an export, read back with plain onnx / torch.jit only."""
    if format == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props["selfsup_pixels"])
    extra = {"selfsup_pixels.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["selfsup_pixels.json"])


def _run_exported(path: Path, format: str, x: np.ndarray) -> np.ndarray:
    """The exported function on float32 x N×C×H×W, in onnxruntime or plain TorchScript."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": x})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["uint16 TIFF stacks", "uint8 RGB"])
def test_onnx_and_torchscript_say_how_raw_pixels_feed_them(
    format, kind, tiffs, rgb, tmp_path
) -> None:
    if format == "onnx":
        pytest.importorskip("onnxruntime")  # the ONNX export checks itself in it
    if kind == "uint8 RGB":
        test_x, run = rgb
        raw = test_x.transpose(0, 3, 1, 2)
        expected_type = {"dtype": "uint8", "offset": 0.0, "scale": 255.0, "channels": 3}
    else:
        folder, written, run = tiffs
        _, test = load_splits(f"folder:{folder}")
        raw = np.stack([written[p].transpose(2, 0, 1) for p in test.paths])  # the files' uint16
        expected_type = {**UINT16, "channels": BANDS}
    features, _ = selfsup.embed(run, split="test")  # the pipeline: data decoded by selfsup
    path = export(run, format=format, out=tmp_path / f"encoder.{format}")
    rule = _exported_pixels(path, format)
    assert {k: rule[k] for k in expected_type} == expected_type
    with safe_open(str(export(run, format="safetensors", out=tmp_path / "e.st")), "pt") as f:
        assert rule == json.loads(f.metadata()["selfsup_pixels"])  # the same rule everywhere
    # by hand, float64: x = (raw - offset) / scale goes in; the encoder normalises x itself
    x = (raw.astype(np.float64) - rule["offset"]) / rule["scale"]
    ours = _run_exported(path, format, x.astype(np.float32))
    np.testing.assert_allclose(ours, features, rtol=1e-5, atol=1e-5)
    # ... by the rule's mean and std: its backbone on (x - mean) / std gives the same features
    mean, std = (np.asarray(rule[k], np.float64).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    z = torch.from_numpy(((x - mean) / std).astype(np.float32))
    with torch.no_grad():
        backbone = selfsup.load(run).backbone(z).numpy()
    np.testing.assert_allclose(backbone, features, rtol=1e-5, atol=1e-5)


def test_the_pixel_type_is_recorded_at_pretraining_and_export_reads_no_data(
    tiffs, rgb, tmp_path, monkeypatch
) -> None:
    import shutil

    import yaml

    from selfsup.image.data import pixels

    _, _, run = tiffs
    assert rundir.read_config(run)["dataset"]["pixels"] == UINT16
    assert rundir.read_config(rgb[1])["dataset"]["pixels"] == {
        "dtype": "uint8",
        "offset": 0.0,
        "scale": 255.0,
    }

    def copy(name: str, *, older: bool = False, data: str | None = None) -> Path:
        """The run copied; `older`: without dataset.pixels, as earlier versions wrote it."""
        shutil.copytree(run, tmp_path / name)
        config = rundir.read_config(tmp_path / name)
        if older:
            del config["dataset"]["pixels"]
        config["data"] = data or config["data"]
        (tmp_path / name / rundir.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        return tmp_path / name

    def rule(of: Path) -> str:
        path = export(of, format="safetensors", out=tmp_path / f"{of.name}.safetensors")
        with safe_open(str(path), "pt") as f:
            return f.metadata()["selfsup_pixels"]

    new = rule(run)
    # a run folder from before the field (no dataset.pixels): its data read, the same export
    assert rule(copy("older", older=True)) == new
    # data gone: an older run says null as it always did; a new one still knows its pixels
    gone = f"folder:{tmp_path / 'moved'}"
    assert json.loads(rule(copy("older-moved", older=True, data=gone)))["dtype"] is None
    monkeypatch.setattr(pixels, "source_dtype", lambda *a: pytest.fail("export read the data"))
    assert rule(copy("moved", data=gone)) == new
    assert json.loads(new)["dtype"] == "uint16"
