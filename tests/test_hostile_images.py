"""Crafted image and .npz files: no crash signal, bounded memory, one line each (issue 34.1).

Every crafted file is made here. The decoding runs in a subprocess, so that a native crash
(SIGSEGV in a C decoder) fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from selfsup.cli.main import main
from selfsup.image.data import load_splits, stratified_indices
from selfsup.image.data.sources import held_out_indices


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png(width: int, height: int, rows: int, channels: int = 3) -> bytes:
    """A PNG whose header says width×height but whose data holds only `rows` rows."""
    color = {1: 0, 3: 2}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    packer, parts = zlib.compressobj(9), []
    row = b"\x00" + bytes(width * channels)
    parts = [packer.compress(row) for _ in range(rows)] + [packer.flush()]
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def _jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def _run(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; a crash signal shows as a negative return code."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def _crafted_images(folder: Path) -> dict[str, bytes]:
    good = _jpeg(folder / "good.jpg")
    png_whole = _png(32, 32, 32)
    return {
        "short-data.png": _png(32, 32, 2),  # SIGSEGV in torchvision's libpng before the fix
        "cut-in-half.png": png_whole[: len(png_whole) // 2],
        "cut.jpg": good[: len(good) // 3],
        "garbage.png": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
        "empty.jpg": b"",
        "bomb.png": _png(20000, 20000, 20000, channels=1),  # 389 KB, 400 MP of grey
    }


def test_crafted_images_never_crash_and_stay_small(tmp_path):
    folder = tmp_path / "crafted"
    folder.mkdir()
    crafted = _crafted_images(folder)
    for name, data in crafted.items():
        (folder / name).write_bytes(data)
    result = _run(
        f"""
        import json, resource, sys
        from pathlib import Path
        from selfsup.image.use.classify import load_image_files
        from selfsup.image.data.decode import decode_image
        from selfsup.core.errors import SelfsupError
        load_image_files([{str(folder / "good.jpg")!r}], (3, 16, 16))  # decoders loaded
        out, grown = {{}}, {{}}
        for path in sorted(Path({str(folder)!r}).iterdir()):
            print(path.name, file=sys.stderr, flush=True)  # the last name is the culprit
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for how, call in (
                ("decode", lambda: tuple(decode_image(path).shape)),
                ("query", lambda: tuple(load_image_files([str(path)], (3, 16, 16)).shape)),
            ):
                try:
                    out[path.name + " " + how] = ["ok", list(call())]
                except SelfsupError as e:
                    out[path.name + " " + how] = ["error", str(e)]
            grown[path.name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"results": out, "grown_kb": grown}}))
        """
    )
    assert result.returncode == 0, f"crashed (rc {result.returncode}) on: {result.stderr[-300:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert results["good.jpg decode"] == ["ok", [3, 48, 64]]
    assert results["good.jpg query"] == ["ok", [1, 3, 16, 16]]
    for name in ("cut-in-half.png", "cut.jpg", "garbage.png", "empty.jpg", "bomb.png"):
        for how in ("decode", "query"):
            kind, message = results[f"{name} {how}"]
            assert kind == "error" and name in message and "\n" not in message, (name, message)
    assert "pixels" in results["bomb.png decode"][1]
    # the short-data PNG decodes (PIL fills the missing rows) or is refused: either, no crash
    assert results["short-data.png decode"][0] in ("ok", "error")
    # the 400 MP bomb (sorted first) was refused from its header: none of its 400 MB allocated
    assert report["grown_kb"]["bomb.png"] < 20_000, report["grown_kb"]


def test_pretrain_on_a_folder_with_a_crafted_png_is_one_line(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _jpeg(folder / f"ok{i}.jpg")
    (folder / "bad.png").write_bytes(_png(32, 32, 2)[:-30])  # data and IEND cut off
    result = _run(
        f"""
        import sys
        from selfsup.cli.main import main
        sys.exit(main(["pretrain", "simclr", "--data", "folder:{folder}", "--epochs", "1",
                       "--out", "{tmp_path / "run"}", "--image-size", "16"]))
        """
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("selfsup: error: ") and "bad.png" in error, error


def test_max_pixels_is_the_limit_and_the_option_sets_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFSUP_MAX_PIXELS", "")  # empty: the default; undone after the test
    image = tmp_path / "photo.jpg"
    _jpeg(image, (64, 48))  # 3,072 pixels
    out = tmp_path / "grid.png"
    assert main(["--max-pixels", "3000", "augment-preview", str(image), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "64×48 is 3,072 pixels, over the limit of 3,000" in err and "--max-pixels" in err
    assert not out.exists()
    monkeypatch.setenv("SELFSUP_MAX_PIXELS", "3072")  # exactly the image: allowed
    assert main(["augment-preview", str(image), "-o", str(out), "--size", "32"]) == 0
    assert out.is_file()


def test_large_jpegs_decode_at_a_reduced_scale_when_shrunk(tmp_path):
    from PIL import Image

    from selfsup.image.data.decode import decode_image

    image = tmp_path / "big.jpg"
    _jpeg(image, (800, 600))
    full = decode_image(image)
    assert tuple(full.shape) == (3, 600, 800)
    small = decode_image(image, min_side=100)  # DCT scaling by 4: 200×150, short side >= 100
    assert tuple(small.shape) == (3, 150, 200)
    with Image.open(image) as im:  # PIL's own reduced decode is the reference
        im.draft("RGB", (200, 150))
        reference = np.asarray(im.convert("RGB"))
    assert np.array_equal(small.permute(1, 2, 0).numpy(), reference)
    assert tuple(decode_image(image, min_side=400).shape) == (3, 600, 800)  # not 2x: full


# ---- .npz ------------------------------------------------------------------------------------


def _zero_bomb(path: Path, n: int = 100_000) -> int:
    """A savez_compressed of n zero 64×64 grey images with labels: small on disk, n×4 KB
    uncompressed. Returns the uncompressed size of x."""
    x = np.zeros((n, 64, 64), dtype=np.uint8)
    np.savez_compressed(path, x=x, y=np.arange(n) % 10)
    return x.nbytes


def test_npz_limit_materialises_only_the_rows_kept(tmp_path):
    path = tmp_path / "zeros.npz"
    nbytes = _zero_bomb(path)
    assert path.stat().st_size < nbytes / 100  # a bomb: 1% of its size on disk
    result = _run(
        f"""
        import json, resource
        from selfsup.image.data import load_splits
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        train, test = load_splits("npz:{path}", limit=64)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps([len(train), len(test), grown]))
        """
    )
    assert result.returncode == 0, result.stderr[-500:]
    train_n, test_n, grown_kb = json.loads(result.stdout.strip().splitlines()[-1])
    assert (train_n, test_n) == (64, 20_000)
    # 64 + 20,000 held-out images of 4 KB = 82 MB; the whole array would be 410 MB
    assert grown_kb < 200_000, grown_kb


def test_npz_rows_are_the_ones_the_whole_array_gives(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 5, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 300)
    np.savez_compressed(tmp_path / "data.npz", x=x, y=y, classes=np.array(list("abcd")))
    train, test = load_splits(f"npz:{tmp_path / 'data.npz'}", limit=50)
    held = held_out_indices(y)  # the reference: whole arrays, indexed by hand
    rest = np.setdiff1d(np.arange(300), held)
    kept = rest[stratified_indices(y[rest], 50, seed=None)]
    assert np.array_equal(train.x.permute(0, 2, 3, 1).numpy(), x[kept])
    assert np.array_equal(train.y.numpy(), y[kept])
    assert np.array_equal(test.x.permute(0, 2, 3, 1).numpy(), x[held]) and test.held_out
    assert train.classes == list("abcd")
    # a folder of parts: rows counted across train-1, train-2 in name order, test.npz whole
    folder = tmp_path / "parts"
    folder.mkdir()
    np.savez(folder / "train-1.npz", x=x[:120], y=y[:120])  # stored, not compressed
    np.savez_compressed(folder / "train-2.npz", x=x[120:], y=y[120:])
    np.savez_compressed(folder / "test.npz", x=x[:7], y=y[:7])
    train, test = load_splits(f"npz:{folder}", limit=40)
    kept = stratified_indices(y, 40, seed=None)
    assert np.array_equal(train.x.permute(0, 2, 3, 1).numpy(), x[kept])
    assert np.array_equal(test.x.permute(0, 2, 3, 1).numpy(), x[:7]) and not test.held_out


def _npz_with_header(path: Path, shape: tuple[int, ...], data: bytes) -> None:
    """An .npz whose x.npy header claims `shape` but holds `data`."""
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: _npz_with_header(p, (100000, 512, 512, 3), bytes(1000)), "claims shape"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000)), "not a readable .npz"),
        (
            lambda p: np.savez(p, x=np.array([{"a": 1}, None], dtype=object)),
            "holds Python objects",
        ),
    ],
    ids=["header-lies", "random-bytes", "pickled"],
)
def test_bad_npz_files_are_one_line_and_never_suggest_unpickling(tmp_path, capsys, make, words):
    path = tmp_path / "data.npz"
    make(path)
    code = main(["pretrain", "simclr", "--data", f"npz:{path}", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert words in err and str(path) in err, err
    assert "unsafe" not in err and "allow_pickle" not in err, err


def test_a_bare_folder_is_read_as_its_kind(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        _jpeg(photos / f"{i}.jpg", (20, 20))
    train, test = load_splits(str(photos))
    assert len(train) == 3 and test is None and train.image_size == (20, 20)
    parts = tmp_path / "arrays"
    parts.mkdir()
    np.savez(parts / "train.npz", x=np.zeros((4, 8, 8), dtype=np.uint8))
    train, _ = load_splits(str(parts))
    assert len(train) == 4 and train.image_size == (8, 8)
