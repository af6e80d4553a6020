"""WebDataset tar shards: `--data wds:PATTERN`, `selfsup shard --format wds`.

PATTERN is a folder of .tar files, a brace pattern (`/data/shards-{000000..000009}.tar`) or a
glob of local tar files (uncompressed, as webdataset writes them). A sample is the tar members
sharing a key (webdataset's rule: the name up to its first dot): one image (`jpg`, `jpeg`,
`png`, `webp`, `bmp`, `tif`, `tiff`, or `npy`: an H×W×C array) and, when present, its label
as text in `cls`. Images decode exactly as `shards.decode_sample` (as a folder of the same
files reads: 8-bit files as uint8 RGB, alpha dropped; TIFF stacks and 16-bit PNGs with their
channels and pixel type; .npy arrays as stored).
`selfsup shard --format wds` writes DIR/train/shard-000000.tar ..., DIR/test/... (the source's
test split, or its held-out 20%) and DIR/selfsup.json (classes, whether test is held out);
the bytes of each file as they are, arrays as PNG (uint8 RGB) or .npy. A pattern of other
tars is one train split; labelled (`cls`), it gets a held-out 20% test split as every source.

The tars' headers are read once at load (an index: which member of which tar is image i), so
statistics and evaluation read images by index; training streams them through webdataset.

Training stream, each epoch E: the shard list is shuffled with seed + E (the same order in
every process), `split_by_node` gives process r of W the shards r, r + W, ...,
`split_by_worker` splits those among its DataLoader workers the same way, each worker
shuffles its samples in a buffer of SHUFFLE_BUFFER (seeded by seed, E, r, worker) and decodes
them; the main process cuts the stream into batches. Every process takes the same number of
batches each epoch (DDP needs it): `len(loader)` = the smallest share a process can get, the
sum of the S // W smallest shards, over the batch size. So when shards divide evenly (equal
shards, S a multiple of W) an epoch covers every image once (less a last partial batch);
otherwise a process with more or larger shards leaves its last images of that epoch unseen
(at most about one shard's worth; which ones changes with the shuffle). Fewer shards than
processes is one line; workers beyond a process's shard count would idle and are not started.

Resume (webdataset itself keeps no position inside an epoch): `selfsup pretrain` checkpoints at
epoch ends, and Lightning's `set_epoch` gives a resumed run the same shard order and buffer
shuffle as an uninterrupted one, so resume is exact there. A loader given a mid-epoch
`state_dict()` (epoch and batches yielded) starts that epoch again from its beginning and
skips (decodes and drops) the batches already yielded: exact with the same processes, workers
and batch size; with others the order differs, so some images repeat and as many go unseen
that epoch, and it says so on stderr.
"""

from __future__ import annotations

import glob
import json
import random
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from selfsup.core.errors import SelfsupError, first_line
from selfsup.image.data.decode import image_header
from selfsup.image.data.images import ImageData
from selfsup.image.data.shards import (
    META,
    NPY,
    DecodeSample,
    _Named,
    check_empty,
    encoded_image,
    sample_dims,
)

INSTALL = 'webdataset is not installed: pip install "selfsup[wds]" (or pip install webdataset)'
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "npy")
SHARD_SIZE = 1000  # images per tar shard written, by default
SHUFFLE_BUFFER = 1000  # samples (encoded) each worker shuffles among
EXTENSION = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "WEBP": "webp", "BMP": "bmp"}


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise SelfsupError(INSTALL) from None
    return webdataset


def image_entry(sample: dict[str, Any]) -> str | None:
    """The entry of a sample (its extensions) holding the image, None if it has none."""
    return next((ext for ext in IMAGE_EXTS if ext in sample), None)


# ---- the index ---------------------------------------------------------------------------


@dataclass
class _Index:
    """Every sample of some tars: its tar, key, image member (offset, size) and label."""

    files: list[str]
    shard: np.ndarray  # int64, into files
    key: list[str]
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray  # -1: no cls

    def take(self, rows: np.ndarray) -> _Index:
        return _Index(
            self.files,
            self.shard[rows],
            [self.key[i] for i in rows],
            self.offset[rows],
            self.size[rows],
            self.label[rows],
        )


def _scan(path: str) -> list[tuple[str, int, int, int]]:
    """(key, image offset, image size, label) of a tar's samples, from its headers and `cls`."""
    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(path, "r:") as tar:
            length = Path(path).stat().st_size
            groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                if member.offset_data + member.size > length:
                    raise SelfsupError(f"{path}: a damaged shard: {member.name} is cut short")
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext.lower()] = member
            samples = []
            for key, members in groups:
                image = image_entry(members)
                if image is None:
                    entries = ", ".join(members) or "nothing"
                    raise SelfsupError(f"{path}: sample {key} has no image (entries: {entries})")
                label = -1
                if "cls" in members:
                    text = tar.extractfile(members["cls"]).read()  # type: ignore[union-attr]
                    try:
                        label = int(text.decode().strip())
                    except ValueError:
                        raise SelfsupError(
                            f"{path}: sample {key}'s cls is {text[:20]!r}, expected an integer"
                        ) from None
                member = members[image]
                samples.append((key, member.offset_data, member.size, label))
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise SelfsupError(f"{path}: not a readable tar shard ({first_line(e)})") from None
    if not samples:
        raise SelfsupError(f"{path}: no images in it (a shard holds {', '.join(IMAGE_EXTS)})")
    return samples


def _index(files: list[str]) -> _Index:
    shard, keys, offset, size, label = [], [], [], [], []
    for i, path in enumerate(files):
        for key, start, length, y in _scan(path):
            shard.append(i)
            keys.append(key)
            offset.append(start)
            size.append(length)
            label.append(y)
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return _Index(files, as_array(shard), keys, as_array(offset), as_array(size), as_array(label))


def expand_pattern(pattern: str, spec: str) -> list[str]:
    """The tar files of PATTERN: a folder's *.tar, else its brace expansion (each part may be a
    glob); one line when none exists, or a part of it is missing."""
    if "://" in pattern or pattern.startswith("pipe:"):
        raise SelfsupError(
            f"--data {spec}: wds: reads local tar files (a folder, a brace pattern or a glob); "
            "stream object storage with litdata:URL, or mount the bucket"
        )
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar"))
        if not files:
            raise SelfsupError(f"--data {spec}: no .tar files in {path}")
        return files
    from webdataset.shardlists import expand_urls

    parts = expand_urls(str(path))
    found = [sorted(glob.glob(p)) if glob.has_magic(p) else [p] for p in parts]
    files = [f for group in found for f in group if Path(f).is_file()]
    if not files:
        raise SelfsupError(f"--data {spec}: no tar file matches {pattern}")
    missing = next((f for group in found for f in group if not Path(f).is_file()), None)
    if missing is not None:
        raise SelfsupError(f"--data {spec}: {missing} does not exist ({len(files)} shards do)")
    return files


# ---- images by index ---------------------------------------------------------------------


class WdsImages(Dataset):
    """Tar shards as images: item i -> (C×size×size, label) as `shards.decode_sample` gives,
    read by index through the tars' index (a map-style Dataset); streamed for training by
    `streaming_loader`, which `batch_loader` calls."""

    def __init__(self, index: _Index, size: int | None, name: str) -> None:
        self.index, self.name = index, name
        first = self.encoded(0)
        self.size = size if size is not None else min(sample_dims(first, self._where(0)))
        self.kind: tuple[int, torch.dtype] | None = None
        image = self._decode(0, first)
        self.kind = (int(image.shape[0]), image.dtype)

    def __len__(self) -> int:
        return len(self.index.key)

    def _where(self, i: int) -> str:
        return f"{self.index.files[self.index.shard[i]]} (sample {self.index.key[i]})"

    def _decode(self, i: int, data: bytes) -> torch.Tensor:
        item = {"image": data, "label": int(self.index.label[i])}
        return DecodeSample(self.size, self._where(i), self.kind)(item)[0]

    def encoded(self, i: int) -> bytes:
        """Sample i's image bytes as stored."""
        with open(self.index.files[self.index.shard[i]], "rb") as f:
            f.seek(int(self.index.offset[i]))
            data = f.read(int(self.index.size[i]))
        if len(data) != self.index.size[i]:
            raise SelfsupError(f"{self._where(i)}: a damaged shard (cut short)")
        return data

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._decode(i, self.encoded(i)), int(self.index.label[i])

    def subset(self, rows: np.ndarray) -> WdsImages:
        """These images restricted to `rows` (still streamed)."""
        picked = WdsImages.__new__(WdsImages)
        picked.index, picked.name = self.index.take(np.asarray(rows, dtype=np.int64)), self.name
        picked.size, picked.kind = self.size, self.kind
        return picked

    def streaming_loader(
        self, batch_size: int, drop_last: bool, seed: int, workers: int
    ) -> WdsLoader:
        """Shuffled batches (x B×C×H×W, y int64 B) streamed through webdataset: see the module."""
        return WdsLoader(self, batch_size, drop_last, seed, workers)


# ---- the training stream -----------------------------------------------------------------


class _Keep:
    """webdataset select: the samples of `keys` (url -> the keys kept of that tar)."""

    def __init__(self, keys: dict[str, set[str]]) -> None:
        self.keys = keys

    def __call__(self, sample: dict[str, Any]) -> bool:
        return sample["__key__"] in self.keys.get(sample["__url__"], ())


class _Item:
    """webdataset map: a sample -> (image, label) as `WdsImages` decodes it."""

    def __init__(self, images: WdsImages) -> None:
        self.size, self.kind, self.name = images.size, images.kind, images.name

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        where = f"{sample['__url__']} (sample {sample['__key__']})"
        ext = image_entry(sample)
        if ext is None:
            raise SelfsupError(f"{where}: no image in the sample")
        label = int(sample["cls"].decode()) if "cls" in sample else -1
        return DecodeSample(self.size, where, self.kind)({"image": sample[ext], "label": label})


def _stack(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _damaged(exn: Exception) -> bool:
    """webdataset's handler: a tar that fails while streamed is one line."""
    if isinstance(exn, SelfsupError):
        raise exn
    where = next((a for a in reversed(exn.args) if isinstance(a, str)), "a shard")
    what = exn.args[0] if exn.args else exn
    raise SelfsupError(f"{where}: a damaged shard ({first_line(what)})") from None


class _Stream(IterableDataset):
    """One epoch of webdataset's pipeline, run in each DataLoader worker: see the module."""

    def __init__(self, images: WdsImages, seed: int, epoch: int, chunk: int) -> None:
        self.images, self.seed, self.epoch, self.chunk = images, seed, epoch, chunk

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        wds = _webdataset()
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        index = self.images.index
        keep: dict[str, set[str]] = {}
        for shard, key in zip(index.shard.tolist(), index.key, strict=True):
            keep.setdefault(index.files[shard], set()).add(key)
        rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(_shards(index), seed=self.seed + self.epoch),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_damaged),
            wds.select(_Keep(keep)),
            wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng),
            wds.map(_Item(self.images), handler=_damaged),
            wds.batched(self.chunk, collation_fn=_stack, partial=True),
        )
        return iter(pipeline)


def _shards(index: _Index) -> list[str]:
    """The tars holding the index's samples, in order."""
    return [index.files[i] for i in np.unique(index.shard)]


def _shares(index: _Index, seed: int, epoch: int, world: int) -> list[int]:
    """Each process's images in `epoch`, as webdataset splits the shards (SimpleShardList's
    shuffle, then split_by_node)."""
    shards = _shards(index)
    counts = dict(zip(*np.unique(index.shard, return_counts=True), strict=True))
    sizes = {index.files[i]: int(n) for i, n in counts.items()}
    random.Random(seed + epoch).shuffle(shards)
    return [sum(sizes[s] for s in shards[r::world]) for r in range(world)]


class WdsLoader:
    """Batches of one process's share of the shards, one epoch per iteration (see the module);
    Lightning calls `sampler.set_epoch` before each epoch, `state_dict` at checkpoints."""

    def __init__(
        self, images: WdsImages, batch_size: int, drop_last: bool, seed: int, workers: int
    ) -> None:
        self.images, self.batch_size, self.drop_last = images, batch_size, drop_last
        self.seed, self.max_workers = seed, workers
        self.sampler = self  # where Lightning looks for set_epoch
        self.epoch, self.yielded, self.skip = 0, 0, (-1, 0)

    def _plan(self) -> tuple[int, int, int, int]:
        """(rank, world size, workers, the smallest share of a process), read when used: the
        process group starts after the loader is made."""
        rank, world, _, _ = _webdataset().utils.pytorch_worker_info()
        per_shard = np.sort(np.unique(self.images.index.shard, return_counts=True)[1])
        shards, name = len(per_shard), self.images.name
        if shards < world:
            raise SelfsupError(
                f"{name}: {shards} shard(s) for {world} processes: each process needs at least "
                "one (selfsup shard --shard-size N writes smaller ones)"
            )
        least = int(per_shard[: shards // world].sum())
        if self.drop_last and least < self.batch_size:
            raise SelfsupError(
                f"{name}: a process may get only {least} images of an epoch, fewer than batch "
                f"size {self.batch_size}; lower --batch-size or write smaller shards"
            )
        return rank, world, min(self.max_workers, shards // world), least

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rank, world, _, least = self._plan()
        if self.drop_last:
            return least // self.batch_size
        share = _shares(self.images.index, self.seed, self.epoch, world)[rank]
        return -(-share // self.batch_size)

    def _setting(self) -> dict[str, int]:
        _, world, workers, _ = self._plan()
        return {"world": world, "workers": workers, "batch_size": self.batch_size}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.yielded, **self._setting()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue epoch `state["epoch"]` after its `state["batches"]` (see the module)."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        self.epoch = epoch
        if 0 < batches < len(self):
            self.skip = (epoch, batches)
            if any(state.get(k) != v for k, v in self._setting().items()):
                print(
                    f"{self.images.name}: resuming epoch {epoch} after {batches} batches with "
                    "other processes, workers or batch size: webdataset keeps no position in an "
                    "epoch, so some of its images repeat and as many go unseen",
                    file=sys.stderr,
                )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, steps, workers = self.epoch, len(self), self._plan()[2]
        skip = self.skip[1] if self.skip[0] == epoch else 0
        self.skip, self.yielded = (-1, 0), 0
        stream = _Stream(self.images, self.seed, epoch, self.batch_size)
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        for x, y in _rebatch(loader, self.batch_size, self.drop_last):
            if self.yielded == steps:
                break
            self.yielded += 1
            if self.yielded > skip:
                yield x, y
        self.epoch, self.yielded = epoch + 1, 0  # the next epoch, nothing of it yielded yet


def _rebatch(chunks: Any, size: int, drop_last: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """Workers' chunks cut into batches of `size` (a chunk of that size passes as it is)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    for x, y in chunks:
        if not held and len(x) == size:
            yield x, y
            continue
        xs.append(x)
        ys.append(y)
        held += len(x)
        while held >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, held = [x_all[size:]], [y_all[size:]], held - size
    if held and not drop_last:
        yield torch.cat(xs), torch.cat(ys)


# ---- --data wds:PATTERN ------------------------------------------------------------------


def load_wds(
    arg: str, spec: str, image_size: int | None, max_size: int
) -> tuple[ImageData, ImageData | None]:
    """(train, test) of `wds:PATTERN`: the splits `selfsup shard --format wds` wrote (a folder
    with selfsup.json), or the pattern's tars as one train split (`load_splits` holds out a
    test split of labelled ones). Images are `image_size` square (default: the first image's
    short side, at most `max_size`)."""
    _webdataset()
    root = Path(arg).expanduser()
    meta = None
    if root.is_dir() and (root / META).is_file():
        try:
            meta = json.loads((root / META).read_text())
        except (OSError, ValueError) as e:
            raise SelfsupError(f"--data {spec}: {META} is damaged ({first_line(e)})") from None
        if meta.get("format") != "wds":
            raise SelfsupError(
                f"--data {spec}: {arg} holds litdata shards; use --data litdata:{arg}"
            )
    if meta is None:  # labelled (cls): load_splits holds out a test split
        return _split(expand_pattern(arg, spec), None, image_size, max_size, spec), None
    classes = meta.get("classes")
    train = _split(expand_pattern(str(root / "train"), spec), classes, image_size, max_size, spec)
    if not (root / "test").is_dir():
        return train, None
    test = _split(expand_pattern(str(root / "test"), spec), classes, train.image_size[0], 0, spec)
    test.held_out = bool(meta.get("held_out"))
    return train, test


def _split(
    files: list[str], classes: list[str] | None, size: int | None, max_size: int, spec: str
) -> ImageData:
    index = _index(files)
    images = WdsImages(index, size, spec)
    if size is None and images.size > max_size:
        images = WdsImages(index, max_size, spec)
    return _data(images, classes, spec)


def _data(images: WdsImages, classes: list[str] | None, name: str, held_out: bool = False):
    labels = images.index.label
    y = torch.from_numpy(labels.copy()) if (labels >= 0).any() else None
    return ImageData(None, y, classes, name, lazy=images, held_out=held_out)


def wds_subset(data: ImageData, indices: np.ndarray) -> ImageData:
    """`data` (of WdsImages) restricted to `indices`, still streamed."""
    images: WdsImages = data.lazy  # type: ignore[assignment]
    return _data(images.subset(indices), data.classes, data.name, data.held_out)


# ---- selfsup shard --format wds ----------------------------------------------------------


def _extension(data: bytes, name: str) -> str:
    if data[:6] == NPY:
        return "npy"
    fmt = image_header(_Named(data, name))[0]
    return EXTENSION.get(fmt, fmt.lower())


def write_wds(
    train: ImageData, test: ImageData | None, out: str, *, shard_size: int = SHARD_SIZE
) -> dict[str, int]:
    """Write the splits as WebDataset tar shards of `shard_size` images under `out` (see the
    module docstring); returns each split's number of images."""
    wds = _webdataset()
    check_empty(out)
    splits = {"train": train, **({"test": test} if test is not None else {})}
    for name, data in splits.items():
        folder = Path(out).expanduser() / name
        folder.mkdir(parents=True)
        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as w:
            for i in range(len(data)):
                image = encoded_image(data, i)
                sample = {"__key__": f"{i:08d}", _extension(image, f"{data.name} image {i}"): image}
                if data.y is not None and data.y[i] >= 0:
                    sample["cls"] = str(int(data.y[i])).encode()
                w.write(sample)
    labelled = any(d.has_labels for d in splits.values())
    meta = {
        "format": "wds",
        "classes": train.classes if labelled else None,
        "held_out": bool(test is not None and test.held_out),
        "counts": {k: len(v) for k, v in splits.items()},
    }
    (Path(out).expanduser() / META).write_text(json.dumps(meta))
    return {k: len(v) for k, v in splits.items()}
