"""litdata shards: `selfsup shard` writes a folder's files as they are, `--data litdata:DIR` reads
them back, streams a disjoint share to every process and worker, and resumes mid-epoch as
litdata guarantees (see selfsup.image.data.shards)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.image.data import batch_loader, load_splits
from selfsup.image.data.decode import decode_image
from selfsup.image.data.shards import ShardImages, write_shards

N = 24  # images, each with its index in its first pixel's red value
CLASSES = ["cat", "dog", "owl"]


def _photos(root: Path, n: int = N, side: int = 16) -> Path:
    """Class folders of distinct PNG and JPEG files; image i has red = 10 * i at pixel (0, 0)."""
    for i in range(n):
        folder = root / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        a = rng.integers(0, 256, (side, side + 4 * (i % 2), 3), dtype=np.uint8)
        a[:4, :4] = (10 * i, 0, 0)  # a flat corner: JPEG keeps it to within a few levels
        Image.fromarray(a).save(folder / f"{i:02d}.{'jpg' if i % 4 == 1 else 'png'}")
    return root


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 1, 1].float() / 10).round().long().tolist()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    photos = _photos(root / "photos")
    train, test = load_splits(f"folder:{photos}", stream=True)
    write_shards(train, test, str(root / "out"), chunk_bytes="2KB")  # several chunks
    return photos, root / "out"


def test_round_trip_keeps_bytes_pixels_and_labels(shards: tuple[Path, Path]) -> None:
    photos, out = shards
    files = {p.read_bytes(): (p, CLASSES.index(p.parent.name)) for p in photos.rglob("*.*")}
    train, test = load_splits(f"litdata:{out}", image_size=16)
    assert test is not None and test.held_out and train.classes == CLASSES
    assert len(train) + len(test) == N and len(test) == round(0.2 * N)
    seen = []
    for split in (train, test):
        for i in range(len(split)):
            raw = split.lazy.encoded(i)  # type: ignore[union-attr]
            path, label = files[raw]  # the file's own bytes, not re-encoded
            image, stored = split.lazy[i]  # type: ignore[index]
            assert stored == label == int(split.y[i])  # type: ignore[index]
            reference = decode_image(path)  # the file decoded as a folder source does
            side = min(reference.shape[1:])
            left = (reference.shape[2] - side) // 2
            assert torch.equal(image, reference[:, :side, left : left + side])
            if path.suffix == ".png":  # and PIL's own pixels, independently
                pil = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
                assert torch.equal(image, pil.permute(2, 0, 1)[:, :side, left : left + side])
            seen.append(path)
    assert sorted(seen) == sorted(p for p, _ in files.values())


def test_limit_and_cli(shards: tuple[Path, Path], tmp_path: Path) -> None:
    photos, _ = shards
    assert main(["shard", f"folder:{photos}", "--out", str(tmp_path / "s")]) == 0
    train, _ = load_splits(f"litdata:{tmp_path / 's'}", limit=6)
    assert len(train) == 6 and sorted(train.y.tolist()) == [0, 0, 1, 1, 2, 2]  # type: ignore[union-attr]
    x, y = next(iter(batch_loader(train, 6, shuffle=True, drop_last=True)))
    assert x.dtype == torch.uint8 and sorted(_ids(x)) == sorted(_limit_ids(train))
    assert main(["shard", f"folder:{photos}", "--out", str(tmp_path / "s")]) == 2  # not empty


def _limit_ids(train) -> list[int]:  # type: ignore[no-untyped-def]
    return [_ids(train.lazy[i][0][None])[0] for i in range(len(train))]


def _epochs(rank: int, out: str, result: str) -> None:
    """One of two gloo processes: two epochs through two workers; the ids each saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    train, _ = load_splits(f"litdata:{out}")
    loader = batch_loader(train, 3, shuffle=True, drop_last=False, seed=1, num_workers=2)
    epochs = [[i for x, _ in loader for i in _ids(x)] for _ in range(2)]
    torch.save(epochs, f"{result}{rank}")
    dist.destroy_process_group()


def test_two_processes_two_workers_disjoint_shares(shards: tuple[Path, Path]) -> None:
    _, out = shards
    train, _ = load_splits(f"litdata:{out}")
    everything = sorted(_limit_ids(train))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TEST_PORT"] = str(29500 + os.getpid() % 1000)
        mp.start_processes(_epochs, args=(str(out), f"{tmp}/r"), nprocs=2, start_method="fork")
        ranks = [torch.load(f"{tmp}/r{r}") for r in range(2)]
    for epoch in range(2):
        shares = [ranks[r][epoch] for r in range(2)]
        assert min(map(len, shares)) >= len(everything) // 2  # 19 images: shares of 9 and 10
        assert sorted(shares[0] + shares[1]) == everything  # disjoint, the whole set once
    assert ranks[0][0] != ranks[0][1]  # reshuffled per epoch


def test_resume_mid_epoch_continues_without_repeats(shards: tuple[Path, Path]) -> None:
    _, out = shards
    train, _ = load_splits(f"litdata:{out}")
    everything = sorted(_limit_ids(train))
    first = batch_loader(train, 2, shuffle=True, drop_last=False, num_workers=2)
    seen: list[int] = []
    for step, (x, _) in enumerate(first):
        seen += _ids(x)
        if step == 2:
            state = first.state_dict()  # interrupted after 3 batches
            break
    again = batch_loader(train, 2, shuffle=True, drop_last=False, num_workers=2)
    again.load_state_dict(state)
    rest = [i for x, _ in again for i in _ids(x)]
    assert len(seen) == 6 and sorted(seen + rest) == everything  # no repeat, no skip
    # another worker count: litdata's elastic resume skips nothing and repeats less than a batch
    other = batch_loader(train, 2, shuffle=True, drop_last=False, num_workers=0)
    other.load_state_dict(state)
    rest = [i for x, _ in other for i in _ids(x)]
    assert set(seen + rest) == set(everything) and len(seen) + len(rest) - len(everything) < 2


def test_damaged_shards_are_one_line(shards: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = shards
    for damage in ("cut", "zeroed", "index"):
        copy = tmp_path / damage
        os.system(f"cp -r {out} {copy}")
        chunk = sorted((copy / "train").glob("*.bin"))[0]
        data = chunk.read_bytes()
        if damage == "cut":
            chunk.write_bytes(data[: len(data) // 2])
        elif damage == "zeroed":  # same size, image bytes gone
            chunk.write_bytes(data[:64] + bytes(len(data) - 64))
        else:
            (copy / "train" / "index.json").write_text("{not json")
        with pytest.raises(SelfsupError) as e:
            train, _ = load_splits(f"litdata:{copy}")
            for _ in batch_loader(train, 4, shuffle=True, drop_last=False):
                pass
        assert "\n" not in str(e.value) and str(copy) in str(e.value)


def test_arrays_become_png_and_plain_litdata_reads_unlabeled(tmp_path: Path) -> None:
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    from selfsup.image.data import ImageData

    write_shards(ImageData(x, None, None, "t"), None, str(tmp_path / "a"))
    train, test = load_splits(f"litdata:{tmp_path / 'a'}")
    assert test is None and not train.has_labels
    assert torch.equal(train.images(list(range(10))), x)  # lossless PNG
    plain = ShardImages(str(tmp_path / "a" / "train"), None)  # litdata's folder itself
    assert len(plain) == 10 and Image.open(io.BytesIO(plain.encoded(0))).format == "PNG"


def test_without_litdata_one_line_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "litdata", None)  # import litdata fails
    with pytest.raises(SelfsupError, match=r"pip install \"selfsup\[shards\]\""):
        load_splits("litdata:/nowhere")


def _bands(root: Path, n: int = 12, side: int = 10) -> dict[bytes, tuple[np.ndarray, int]]:
    """Class folders of 6-page uint16 TIFFs (one page a band); each file's array and label by
    its bytes."""
    rng = np.random.default_rng(5)
    written = {}
    for i in range(n):
        array = rng.integers(0, 65536, (side, side, 6), dtype=np.uint16)
        pages = [Image.fromarray(np.ascontiguousarray(array[..., c])) for c in range(6)]
        path = root / CLASSES[i % 3] / f"{i:02d}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        pages[0].save(path, save_all=True, append_images=pages[1:])
        written[path.read_bytes()] = (array, i % 3)
    return written


def test_six_band_uint16_tiffs_keep_channels_and_dtype(tmp_path: Path) -> None:
    from selfsup.image.data.multichannel import read_image

    written = _bands(tmp_path / "bands")
    assert main(["shard", f"folder:{tmp_path / 'bands'}", "--out", str(tmp_path / "s")]) == 0
    train, test = load_splits(f"litdata:{tmp_path / 's'}")
    assert train.channels == 6 and train.image_size == (10, 10) and train.classes == CLASSES
    for split in (train, test):
        for i in range(len(split)):
            raw = split.lazy.encoded(i)  # type: ignore[union-attr]
            array, label = written[raw]  # the TIFF itself
            assert np.array_equal(read_image(io.BytesIO(raw)), array)
            image, stored = split.lazy[i]  # type: ignore[index]
            assert image.dtype == torch.float32 and stored == label
            # exactly raw / 65535, and back to the source's uint16 values
            assert torch.equal(
                image, torch.from_numpy(array.astype(np.float32) / 65535).permute(2, 0, 1)
            )
            assert np.array_equal(
                np.round(image.double().numpy() * 65535), array.transpose(2, 0, 1)
            )
    x, _ = next(iter(batch_loader(train, 4, shuffle=True, drop_last=True)))
    assert x.shape == (4, 6, 10, 10) and x.dtype == torch.float32


def test_arrays_in_memory_keep_channels_and_dtype(tmp_path: Path) -> None:
    from selfsup.image.data import ImageData

    rng = np.random.default_rng(6)
    cases = {
        "float6": torch.from_numpy(rng.random((5, 6, 7, 7), dtype=np.float32)),
        "grey": torch.randint(0, 256, (5, 1, 7, 7), dtype=torch.uint8),
        "rgba": torch.randint(0, 256, (5, 4, 7, 7), dtype=torch.uint8),
    }
    for name, x in cases.items():
        write_shards(ImageData(x, None, None, name), None, str(tmp_path / name))
        train, _ = load_splits(f"litdata:{tmp_path / name}")
        back = train.images(list(range(5)))
        assert back.dtype == x.dtype and torch.equal(back, x), name
