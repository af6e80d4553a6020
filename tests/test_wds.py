"""WebDataset shards: `selfsup shard --format wds` writes a folder's files as they are,
`--data wds:PATTERN` reads them back as the files read, streams a disjoint share to every
process and worker, and resumes as selfsup.image.data.wds says."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset
from PIL import Image

import selfsup
from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.image.data import batch_loader, load_splits
from selfsup.image.data.decode import decode_image
from selfsup.image.data.wds import WdsLoader

CLASSES = ["cat", "dog", "owl"]


def _ids(x: torch.Tensor) -> list[int]:
    """Each image's number, written in its red value at pixel (1, 1) as 10 * i."""
    return (x[:, 0, 1, 1].float() / 10).round().long().tolist()


def _pixels(i: int, side: int = 12) -> np.ndarray:
    a = np.random.default_rng(i).integers(0, 256, (side, side + 4 * (i % 2), 3), dtype=np.uint8)
    a[:4, :4] = (10 * i, 0, 0)  # a flat corner: JPEG keeps it to within a few levels
    return a


def _photos(root: Path, n: int = 15) -> dict[Path, tuple[np.ndarray | None, int]]:
    """Class folders of PNGs and JPEGs; each file's own pixels (None for a JPEG) and label."""
    written = {}
    for i in range(n):
        path = root / CLASSES[i % 3] / f"{i:02d}.{'jpg' if i % 5 == 1 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(i)).save(path)
        written[path] = (None if path.suffix == ".jpg" else _pixels(i), i % 3)
    return written


def _tars(root: Path, shards: int, per: int, labelled: bool = False) -> Path:
    """`shards` tars of `per` PNGs each, written with webdataset's TarWriter (not selfsup)."""
    root.mkdir(parents=True)
    for s in range(shards):
        with webdataset.TarWriter(str(root / f"part-{s:03d}.tar")) as w:
            for j in range(per):
                i = s * per + j
                png = io.BytesIO()
                Image.fromarray(_pixels(i, 8)[:, :8]).save(png, "PNG")
                sample = {"__key__": f"s{i:04d}", "png": png.getvalue()}
                w.write({**sample, "cls": str(i % 3).encode()} if labelled else sample)
    return root


def _centre(a: np.ndarray) -> torch.Tensor:
    side = min(a.shape[:2])
    left = (a.shape[1] - side) // 2
    return torch.from_numpy(np.ascontiguousarray(a[:side, left : left + side])).permute(2, 0, 1)


def test_folder_to_wds_and_back_gives_the_files_pixels_and_labels(tmp_path: Path) -> None:
    written = _photos(tmp_path / "photos")
    out = tmp_path / "s"
    argv = ["shard", f"folder:{tmp_path / 'photos'}", "--out", str(out), "--format", "wds"]
    assert main([*argv, "--shard-size", "4"]) == 0
    assert len(list((out / "train").glob("*.tar"))) == 3  # 12 train images, 4 a shard
    train, test = load_splits(f"wds:{out}")
    assert test is not None and test.held_out and train.classes == CLASSES
    assert len(train) + len(test) == 15 and len(test) == 3
    by_bytes = {p.read_bytes(): (p, *v) for p, v in written.items()}
    seen = []
    for split in (train, test):
        for i in range(len(split)):
            path, pixels, label = by_bytes[split.lazy.encoded(i)]  # type: ignore[union-attr]
            image, stored = split.lazy[i]  # type: ignore[index]
            assert stored == label == int(split.y[i])  # type: ignore[index]
            if pixels is not None:  # PNG: the very pixels written, read by nobody else
                assert torch.equal(image, _centre(pixels))
            else:  # JPEG: as the folder source decodes the file
                assert torch.equal(image, _centre(decode_image(path).permute(1, 2, 0).numpy()))
            seen.append(path)
    assert sorted(seen) == sorted(written)
    # the folder itself, held out and read the same way
    folder_train, _ = load_splits(f"folder:{tmp_path / 'photos'}", image_size=12)
    assert torch.equal(train.images(list(range(len(train)))), folder_train.x)
    assert torch.equal(train.y, folder_train.y)  # type: ignore[arg-type]
    # labelled tars of any origin: labels from cls, a held-out 20% test split, --limit
    plain = _tars(tmp_path / "plain", 5, 4, labelled=True)
    train, test = load_splits(f"wds:{plain}/part-{{000..004}}.tar", limit=6)
    assert test is not None and test.held_out and len(test) == 4 and len(train) == 6
    ids = _ids(train.images(list(range(6))))
    assert train.y.tolist() == [i % 3 for i in ids]  # type: ignore[union-attr]
    x, y = next(iter(batch_loader(train, 6, shuffle=True, drop_last=True)))
    assert sorted(_ids(x)) == sorted(ids) and [i % 3 for i in _ids(x)] == y.tolist()


def _alpha_folder(root: Path) -> dict[str, np.ndarray]:
    """PNGs with transparency (RGBA, LA, P with a transparent index), grey, an RGBA WebP; each
    one's RGB as PIL gives it without alpha, worked out from the arrays written."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    a = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    Image.fromarray(a, "RGBA").save(root / "0.png")
    Image.fromarray(a[..., :2].copy(), "LA").save(root / "1.png")
    p = Image.fromarray(a[..., 0].copy(), "P")
    p.putpalette(palette.reshape(-1).tolist())
    p.save(root / "2.png", transparency=7)
    Image.fromarray(a[..., 0].copy(), "L").save(root / "3.png")
    Image.fromarray(a, "RGBA").save(root / "4.webp", lossless=True, exact=True)
    grey = np.repeat(a[..., :1], 3, axis=2)
    return {"0": a[..., :3], "1": grey, "2": palette[a[..., 0]], "3": grey, "4": a[..., :3]}


@pytest.mark.parametrize("format", ["litdata", "wds"])
def test_transparency_reads_as_a_folder_reads_it(format: str, tmp_path: Path) -> None:
    expected = _alpha_folder(tmp_path / "alpha")
    folder, _ = load_splits(f"folder:{tmp_path / 'alpha'}")
    reference = torch.stack([_centre(expected[str(i)]) for i in range(5)])
    assert torch.equal(folder.x, reference)  # folder: drops alpha (PIL's convert to RGB)
    out = str(tmp_path / "s")
    assert main(["shard", f"folder:{tmp_path / 'alpha'}", "--out", out, "--format", format]) == 0
    shards, _ = load_splits(f"{format}:{out}")
    assert shards.channels == 3 and torch.equal(shards.images(list(range(5))), reference)


def _epochs(rank: int, pattern: str, uneven: str, result: str) -> None:
    """One of two gloo processes: two epochs through two workers; what each worker reads."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    train, _ = load_splits(f"wds:{pattern}")
    loader = batch_loader(train, 3, shuffle=True, drop_last=True, seed=1, num_workers=2)
    epochs = [[i for x, _ in loader for i in _ids(x)] for _ in range(2)]
    workers = []  # each worker's share of epoch 0, as webdataset's split_by_worker makes it
    for w in range(2):
        os.environ.update(WORKER=str(w), NUM_WORKERS="2")
        loader = batch_loader(train, 3, shuffle=True, drop_last=False, seed=1, num_workers=0)
        workers.append([i for x, _ in loader for i in _ids(x)])
    del os.environ["WORKER"], os.environ["NUM_WORKERS"]
    odd, _ = load_splits(f"wds:{uneven}")
    loader = batch_loader(odd, 2, shuffle=True, drop_last=True, seed=1, num_workers=2)
    steps = (len(loader), [i for x, _ in loader for i in _ids(x)])
    torch.save((epochs, workers, steps), f"{result}{rank}")
    dist.destroy_process_group()


def test_two_processes_two_workers_disjoint_shares(tmp_path: Path) -> None:
    _tars(tmp_path / "even", 8, 3)  # 24 images: 4 shards a process, 2 a worker
    _tars(tmp_path / "odd", 5, 3)  # 15: a process gets 2 or 3 shards
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TEST_PORT"] = str(29500 + (os.getpid() + 7) % 1000)
        pattern = f"{tmp_path}/even/part-{{000..007}}.tar"
        args = (pattern, str(tmp_path / "odd"), f"{tmp}/r")
        mp.start_processes(_epochs, args=args, nprocs=2, start_method="fork")
        ranks = [torch.load(f"{tmp}/r{r}") for r in range(2)]
    for epoch in range(2):
        shares = [ranks[r][0][epoch] for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == 12
        assert sorted(shares[0] + shares[1]) == list(range(24))  # disjoint, the whole set once
    assert ranks[0][0][0] != ranks[0][0][1]  # reshuffled per epoch
    workers = [w for r in range(2) for w in ranks[r][1]]
    assert [len(w) for w in workers] == [6] * 4  # two whole shards each
    assert sorted(sum(workers, [])) == list(range(24))
    assert sorted(ranks[0][1][0] + ranks[0][1][1]) == sorted(ranks[0][0][0])
    # 5 shards: the same number of batches in both (the smaller share's), disjoint
    (n0, seen0), (n1, seen1) = ranks[0][2], ranks[1][2]
    assert n0 == n1 == 3 and len(seen0) == len(seen1) == 6 and not set(seen0) & set(seen1)


def test_resume_exact_at_epoch_ends_and_mid_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, _ = load_splits(f"wds:{_tars(tmp_path / 't', 4, 4)}")

    def loader(workers: int = 2) -> WdsLoader:
        return batch_loader(train, 3, shuffle=True, drop_last=True, num_workers=workers)  # type: ignore[return-value]

    first = loader()
    epochs = [[_ids(x) for x, _ in first] for _ in range(2)]
    assert len(first) == 5 and epochs[0] != epochs[1]
    again = loader()
    again.set_epoch(1)  # Lightning's call on resume from an epoch-end checkpoint
    assert [_ids(x) for x, _ in again] == epochs[1]
    halted = loader()
    halted.set_epoch(1)
    seen = []
    for x, _ in halted:
        seen.append(_ids(x))
        if len(seen) == 2:
            state = halted.state_dict()
            break
    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + [_ids(x) for x, _ in resumed] == epochs[1]  # the epoch's rest, exactly
    assert capsys.readouterr().err == ""
    other = loader(workers=1)
    other.load_state_dict(state)
    rest = [_ids(x) for x, _ in other]
    assert len(rest) == 3 and "keeps no position in an epoch" in capsys.readouterr().err
    assert len([_ids(x) for x, _ in other]) == 5  # then the next epoch, whole


def test_pretrain_one_epoch_on_wds_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tars(tmp_path / "t", 4, 6)
    epochs: list[int] = []
    set_epoch = WdsLoader.set_epoch
    monkeypatch.setattr(
        WdsLoader, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e))[1]
    )
    options = dict(
        data=f"wds:{tmp_path / 't'}", batch_size=8, backbone="convnet", num_workers=0, report=False
    )
    straight = selfsup.pretrain(method="simclr", out=str(tmp_path / "a"), epochs=2, **options)
    halted = selfsup.pretrain(method="simclr", out=str(tmp_path / "b"), epochs=1, **options)
    assert (halted / "encoder.safetensors").is_file()
    features, labels = selfsup.embed(halted)
    assert features.shape[0] == 24 and labels is None
    resumed = selfsup.pretrain(resume=str(halted), epochs=2, report=False)
    assert epochs == [0, 1, 0, 1]  # Lightning sets each epoch: the resumed run starts at 1
    from safetensors.torch import load_file

    a, b = load_file(straight / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    for name in a:  # the same second epoch: same shards, same order
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tars(tmp_path / "t", 2, 2)
    (tmp_path / "notes").mkdir()
    with tarfile.open(tmp_path / "notes" / "a.tar", "w") as tar:
        data = b"hello"
        info = tarfile.TarInfo("x.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "b.tar").write_bytes(b"not a tar at all" * 100)
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (tmp_path / "t" / "part-000.tar").read_bytes()
    with tarfile.open(tmp_path / "t" / "part-000.tar") as tar:
        end = tar.getmembers()[-1].offset_data + 5  # inside the last image
    (cut / "c.tar").write_bytes(data[:end])
    cases = {
        f"wds:{tmp_path}/none-{{0..3}}.tar": "no tar file matches",
        f"wds:{tmp_path}/t/part-{{000..002}}.tar": "part-002.tar does not exist",
        f"wds:{tmp_path / 'notes'}": "sample x has no image",
        f"wds:{tmp_path / 'junk'}": "not a readable tar shard",
        f"wds:{cut}": "cut short",
        f"wds:{tmp_path / 'empty'}": "no tar file matches",
        "wds:s3://bucket/shards-{0..9}.tar": "reads local tar files",
    }
    for spec, message in cases.items():
        with pytest.raises(SelfsupError, match=message) as e:
            load_splits(spec)
        assert "\n" not in str(e.value), spec
    one = load_splits(f"wds:{tmp_path}/t/part-000.tar")[0]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SelfsupError, match="1 shard\\(s\\) for 2 processes"):
        len(batch_loader(one, 2, shuffle=True, drop_last=True))
    monkeypatch.setitem(__import__("sys").modules, "webdataset", None)  # import fails
    with pytest.raises(SelfsupError, match=r"pip install \"selfsup\[wds\]\""):
        load_splits(f"wds:{tmp_path / 't'}")
