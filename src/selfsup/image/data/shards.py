"""Sharded image datasets streamed through litdata: `--data litdata:DIR_OR_URL`, `selfsup shard`.

The format is litdata's (optimised chunks + index.json); each sample is
`{"image": bytes, "label": int (-1: none)}`, the bytes being the source file itself (JPEG, PNG,
TIFF stack, 16-bit PNG: read back as a folder of them reads) or, for images held in memory, a
lossless PNG (uint8 RGB) or a `.npy` array H×W×C (any other channel count, float pixels): the
channels and pixel type of the source are kept exactly.
`selfsup shard` writes one litdata folder per split and a small `selfsup.json` beside them:

    DIR/train/  DIR/test/ (the source's test split, or its held-out 20%)  DIR/selfsup.json
    (classes, every split's labels in index order, whether test is held out)

A plain litdata folder (index.json; "image" bytes, optional "label") reads as an unlabeled train
split. DIR may be a local folder or any URL litdata streams from (s3://, gs://, ...).

Training streams: each process and each DataLoader worker reads a disjoint share of the chunks,
shuffled by chunk then within chunks, reseeded per epoch. Other passes (statistics, evaluation)
read samples by index.

Resume (what litdata 0.2.76 guarantees, tested in tests/test_shards.py): a StreamingDataLoader's
`state_dict()` holds the epoch and the number of samples it has yielded; a new loader given it
(`load_state_dict`) with the same world size, workers and batch size continues the epoch with
exactly the samples not yet yielded (none repeated, none skipped). With another world size,
worker count or batch size, litdata resumes "elastically": it drops the samples already seen,
rounded down to a whole global batch (world size × batch size), so fewer than one global batch
may repeat, none is skipped. Lightning keeps that state in its checkpoints.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsup.core.errors import SelfsupError, first_line
from selfsup.image.data.decode import decode_image, image_header, image_mode, square_uint8
from selfsup.image.data.images import ImageData
from selfsup.image.data.multichannel import read_image, to_unit
from selfsup.image.data.transforms import square_resize

INSTALL = 'litdata is not installed: pip install "selfsup[shards]" (or pip install litdata)'
META = "selfsup.json"
SPLITS = ("train", "test")
NPY = b"\x93NUMPY"  # the magic of an .npy array
JPEG = b"\xff\xd8\xff"  # of a JPEG file


def _litdata() -> Any:
    try:
        import litdata
    except ImportError:
        raise SelfsupError(INSTALL) from None
    return litdata


class _Named(io.BytesIO):
    """Encoded image bytes that print as where they came from (in decode's error lines)."""

    def __init__(self, data: bytes | memoryview, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def decode_bytes(data: bytes | memoryview, name: str, min_side: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 3×H×W, as `decode_image` does for a file (`name` in its
    error lines); a full-scale JPEG goes to libjpeg-turbo straight from memory."""
    fmt, width, height = image_header(_Named(data, name))
    if fmt == "JPEG" and not (min_side and min(width, height) >= 2 * min_side):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(buffer, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:  # variants libjpeg-turbo refuses: PIL decodes them or says why
            pass
    return decode_image(_Named(data, name), min_side)


def _array(data: bytes | memoryview, name: str) -> np.ndarray:
    """An .npy sample -> H×W×C array (one line if it is not one)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SelfsupError(f"{name}: not a readable .npy image ({first_line(e)})") from None
    if array.ndim != 3:
        raise SelfsupError(f"{name}: an .npy image of shape {array.shape}, expected H×W×C")
    return array


def sample_dims(data: bytes | memoryview, name: str) -> tuple[int, int]:
    """(width, height) of a sample, from its header alone."""
    if bytes(data[:6]) == NPY:
        from numpy.lib import format as npy

        stream = io.BytesIO(data)
        major, _ = npy.read_magic(stream)
        header = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
        shape = header(stream)[0]
        return int(shape[1]), int(shape[0])
    return image_header(_Named(data, name))[1:]


def _stored(data: bytes | memoryview, name: str) -> np.ndarray | None:
    """A sample as its source's H×W×C array (.npy, TIFF stack, 16-bit PNG); None for an 8-bit
    image file (read as RGB bytes)."""
    head = bytes(data[:6])
    if head == NPY:
        return _array(data, name)
    if head.startswith(JPEG):  # photos, the common case: no header parse beside the decoder's
        return None
    fmt = image_header(_Named(data, name))[0]
    if fmt == "TIFF" or fmt == "PNG" and image_mode(_Named(data, name)).startswith("I"):
        return read_image(_Named(data, name))
    return None


def decode_sample(data: bytes | memoryview, name: str, size: int) -> torch.Tensor:
    """A sample's bytes -> C×size×size (centre square, resized), as its source reads: 8-bit
    image files as uint8 RGB (`decode_bytes`), TIFF stacks and 16-bit PNGs through
    `multichannel.read_image`, .npy arrays as stored; other than uint8, float32 in [0, 1]
    (`multichannel.to_unit`)."""
    array = _stored(data, name)
    if array is None:
        return square_uint8(decode_bytes(data, name, size), size)
    return square_resize(to_unit(array, name).permute(2, 0, 1), size)  # as StackImages


def sample_dtype(data: bytes | memoryview, name: str) -> np.dtype:
    """The pixel type a sample holds before `decode_sample` scales it (uint8 for 8-bit files)."""
    array = _stored(data, name)
    return np.dtype(np.uint8) if array is None else array.dtype


class DecodeSample:
    """litdata transform: a sample -> (C×size×size, label), every sample with the channels and
    pixel type of the first (`kind`; one line naming the shard otherwise)."""

    def __init__(self, size: int, name: str, kind: tuple[int, torch.dtype] | None = None) -> None:
        self.size, self.name, self.kind = size, name, kind

    def __call__(self, item: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if not isinstance(item, dict) or not isinstance(item.get("image"), bytes | memoryview):
            raise SelfsupError(f"{self.name}: a sample without 'image' bytes (not selfsup shards)")
        image = decode_sample(item["image"], f"{self.name} (a sample)", self.size)
        if self.kind is not None and (image.shape[0], image.dtype) != self.kind:
            raise SelfsupError(
                f"{self.name}: a sample of {image.shape[0]} channel(s) of {image.dtype}, the "
                f"first has {self.kind[0]} of {self.kind[1]}; a dataset's images must be alike"
            )
        return image, int(item.get("label", -1))


class ShardImages(Dataset):
    """A litdata dataset as images: item i -> (C×size×size, label) as `decode_sample` gives
    (uint8 RGB for 8-bit files, the source's channels otherwise), read by index (a
    map-style Dataset, so any DataLoader splits it right); streamed for training by
    `streaming_loader`, which `batch_loader` calls."""

    def __init__(self, url: str, size: int | None, indices: list[int] | None = None) -> None:
        self.url, self.indices = url, indices
        self.dataset = _open(url)
        raw = _read(lambda: self._raw(0), url)  # opens litdata's cache: the count, a first check
        if size is None:
            size = min(_read(lambda: sample_dims(raw["image"], url), url))
        self.size = size
        first = _read(lambda: DecodeSample(size, url)(raw), url)[0]
        self.kind = (int(first.shape[0]), first.dtype)
        self.dataset.transform = [DecodeSample(size, url, self.kind)]
        # every process's count (len(StreamingDataset) is this process's share)
        self.total = len(self.dataset.cache) if indices is None else len(indices)

    def _raw(self, i: int) -> dict[str, Any]:
        transform = self.dataset.__dict__.pop("transform", None)
        try:
            return self.dataset[i]
        finally:
            if transform is not None:
                self.dataset.transform = transform

    def __len__(self) -> int:
        return self.total

    def _index(self, i: int) -> int:
        return i if self.indices is None else self.indices[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _read(lambda: self.dataset[self._index(i)], self.url)

    def encoded(self, i: int) -> bytes:
        """Sample i's image bytes as stored."""
        return bytes(_read(lambda: self._raw(self._index(i)), self.url)["image"])

    def streaming_loader(self, batch_size: int, drop_last: bool, seed: int, workers: int) -> Any:
        """A litdata StreamingDataLoader of shuffled (x uint8 B×C×H×W, y int64 B): each process
        and worker a disjoint share, reshuffled every epoch; its state_dict resumes mid-epoch."""
        litdata = _litdata()
        dataset = _open(self.url, shuffle=True, drop_last=drop_last, seed=seed)
        dataset.transform = [DecodeSample(self.size, self.url, self.kind)]
        if self.indices is not None:
            dataset = dataset.subset(self.indices)
        return litdata.StreamingDataLoader(
            dataset, batch_size=batch_size, num_workers=workers, drop_last=drop_last
        )


def _open(url: str, **options: Any) -> Any:
    litdata = _litdata()
    if not _is_url(url):
        _check_chunks(Path(url).expanduser())
    try:
        return litdata.StreamingDataset(url, **options)
    except Exception as e:  # noqa: BLE001 - missing index, damaged index, no network: one line
        raise SelfsupError(f"litdata:{url}: cannot open the shards ({first_line(e)})") from None


def _check_chunks(folder: Path) -> None:
    """A local litdata folder's chunks against its index.json: a missing or cut-short chunk is one
    line here, not litdata's wait for a download that never ends."""
    try:
        chunks = json.loads((folder / "index.json").read_text())["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # litdata says what is wrong with the index
    for chunk in chunks:
        path = folder / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise SelfsupError(
                f"litdata:{folder}: a damaged shard: {chunk['filename']} is {found}, its "
                f"index.json says {chunk['chunk_bytes']} bytes"
            )


def _read(get: Any, url: str) -> Any:
    try:
        return get()
    except SelfsupError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged chunk surfaces as any of litdata's errors
        raise SelfsupError(f"litdata:{url}: a damaged shard ({first_line(e)})") from None


def _is_url(arg: str) -> bool:
    return "://" in arg


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if _is_url(base) else str(Path(base).expanduser() / name)


def _meta(base: str) -> dict[str, Any] | None:
    """DIR/selfsup.json, read from a local folder or fetched through litdata's downloaders."""
    if not _is_url(base):
        path = Path(base).expanduser() / META
        return json.loads(path.read_text()) if path.is_file() else None
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = str(Path(tmp) / META)
        try:
            get_downloader(base, tmp, []).download_file(_join(base, META), local)
            return json.loads(Path(local).read_text())
        except Exception:  # noqa: BLE001 - no selfsup.json: a plain litdata folder
            return None


def load_litdata(
    arg: str, spec: str, image_size: int | None, max_size: int
) -> tuple[ImageData, ImageData | None]:
    """(train, test) of `litdata:DIR_OR_URL`: the splits `selfsup shard` wrote, or DIR itself as
    one unlabeled train split. Images are `image_size` square (default: the first image's short
    side, at most `max_size`)."""
    _litdata()
    if not _is_url(arg) and not Path(arg).expanduser().is_dir():
        raise SelfsupError(f"--data {spec}: {arg} is not a folder (nor a URL)")
    try:
        meta = _meta(arg)
    except (OSError, ValueError) as e:
        raise SelfsupError(f"--data {spec}: {META} is damaged ({first_line(e)})") from None
    if meta is None:
        return _split(arg, None, None, image_size, max_size, spec), None
    if meta.get("format") == "wds":
        raise SelfsupError(f"--data {spec}: {arg} holds WebDataset shards; use --data wds:{arg}")
    classes = meta.get("classes")
    train = _split(
        _join(arg, "train"), meta["labels"]["train"], classes, image_size, max_size, spec
    )
    if "test" not in meta["labels"]:
        return train, None
    test = _split(_join(arg, "test"), meta["labels"]["test"], classes, train.image_size[0], 0, spec)
    test.held_out = bool(meta.get("held_out"))
    return train, test


def _split(
    url: str,
    labels: list[int] | None,
    classes: list[str] | None,
    size: int | None,
    max_size: int,
    spec: str,
) -> ImageData:
    images = ShardImages(url, size)
    if size is None and images.size > max_size:
        images = ShardImages(url, max_size)
    y = None if labels is None else torch.tensor(labels, dtype=torch.long)
    if y is not None and len(y) != len(images):
        raise SelfsupError(f"--data {spec}: {META} lists {len(y)} labels for {len(images)} images")
    return ImageData(None, y, classes, spec, lazy=images)


def streamed_subset(data: ImageData, indices: np.ndarray) -> ImageData:
    """`data` (of ShardImages) restricted to `indices`, still streamed."""
    images: ShardImages = data.lazy  # type: ignore[assignment]
    base = images.indices
    picked = [int(i) if base is None else base[int(i)] for i in indices]
    y = None if data.y is None else data.y[torch.as_tensor(indices, dtype=torch.long)]
    lazy = ShardImages(images.url, images.size, picked)
    return ImageData(None, y, data.classes, data.name, lazy=lazy, held_out=data.held_out)


# ---- writing ---------------------------------------------------------------------------------


def encoded_image(data: ImageData, i: int) -> bytes:
    """Image i as encoded bytes: the file itself when it is one, else a lossless PNG (uint8
    RGB) or .npy array H×W×C (any other channels or pixel type)."""
    if data.paths is not None:
        return Path(data.paths[i]).read_bytes()
    if hasattr(data.lazy, "encoded"):  # shards (litdata, webdataset): the bytes they hold
        return data.lazy.encoded(i)
    from PIL import Image

    x = data.images([i])[0].permute(1, 2, 0).numpy()
    out = io.BytesIO()
    if x.dtype == np.uint8 and x.shape[-1] == 3:
        Image.fromarray(x).save(out, "PNG")
    else:
        np.save(out, np.ascontiguousarray(x), allow_pickle=False)
    return out.getvalue()


class _Sample:
    """litdata.optimize's fn: an index of `data` -> a sample."""

    def __init__(self, data: ImageData) -> None:
        self.data = data

    def __call__(self, i: int) -> dict[str, Any]:
        label = -1 if self.data.y is None else int(self.data.y[i])
        return {"image": encoded_image(self.data, i), "label": label}


def check_empty(out: str) -> None:
    """One line unless `out` is a new or empty folder."""
    if Path(out).expanduser().exists() and any(Path(out).expanduser().iterdir()):
        raise SelfsupError(f"--out {out}: the folder is not empty")


def write_shards(
    train: ImageData,
    test: ImageData | None,
    out: str,
    *,
    chunk_bytes: str = "64MB",
    num_workers: int = 1,
) -> dict[str, int]:
    """Write the splits as litdata shards under `out` (see the module docstring); returns each
    split's number of images."""
    litdata = _litdata()
    check_empty(out)
    splits = {"train": train, **({"test": test} if test is not None else {})}
    labels = {}
    for name, data in splits.items():
        target = _join(out, name)
        litdata.optimize(
            fn=_Sample(data),
            inputs=list(range(len(data))),
            output_dir=target,
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            start_method="fork" if sys.platform == "linux" else None,  # no re-import per worker
            verbose=False,
        )
        # the labels in the order litdata wrote the samples (its workers interleave them)
        written = ShardImages(target, 1)
        labels[name] = [int(written._raw(i)["label"]) for i in range(len(written))]
    labelled = any(d.has_labels for d in splits.values())
    meta = {
        "classes": train.classes if labelled else None,
        "labels": labels if labelled else {k: [-1] * len(v) for k, v in labels.items()},
        "held_out": bool(test is not None and test.held_out),
    }
    (Path(out).expanduser() / META).write_text(json.dumps(meta))
    return {k: len(v) for k, v in labels.items()}
