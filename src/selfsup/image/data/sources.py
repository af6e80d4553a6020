"""`--data` specs -> (train, test) ImageData: digits, npz files, image folders, torchvision sets."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsup.core.errors import SelfsupError, first_line
from selfsup.image.data import multichannel, npz
from selfsup.image.data.decode import DeepPixels, decode_square, image_header
from selfsup.image.data.images import ImageData, decode_all
from selfsup.image.data.transforms import square_resize

TORCHVISION = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "stl10": "STL10",
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "svhn": "SVHN",
}
SHARDS = "litdata:DIR_OR_URL, wds:PATTERN"  # streamed sources (shards.py, wds.py)
SPECS = f"digits, npz:DIR_OR_FILE, folder:PATH, {SHARDS}, " + ", ".join(TORCHVISION)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
STACKS = {".tif", ".tiff"}  # read as channel stacks (multichannel.read_image), never as RGB
HOLDOUT = 0.2  # of a labeled source without a test split, held out as its test split
IN_MEMORY_BYTES = 2 * 1024**3  # folders decoding to less than this (as uint8) are held in memory
MAX_DEFAULT_SIZE = 224  # cap on the default folder image size (the first image's short side)

Split = tuple[ImageData, ImageData | None]


def stratified_indices(
    y: np.ndarray | torch.Tensor | None, n: int, seed: int | None = 0
) -> np.ndarray:
    """`n` sorted indices with each class's share proportional to its size (largest remainder).

    Within a class: the first ones in order when `seed` is None, else a random draw seeded with
    `seed`. `y` None (no labels, length unknown here) -> `arange(n)`; `n >= len(y)` -> all.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if y is None:
        return np.arange(n)
    y = np.asarray(y)
    if n >= len(y):
        return np.arange(len(y))
    labels, counts = np.unique(y, return_counts=True)
    share = n * counts / len(y)
    take = np.floor(share).astype(int)
    take[np.argsort(take - share, kind="stable")[: n - take.sum()]] += 1
    rng = None if seed is None else np.random.default_rng(seed)
    chosen = []
    for label, k in zip(labels, take, strict=True):
        idx = np.flatnonzero(y == label)
        chosen.append(idx[:k] if rng is None else rng.choice(idx, k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# ---- digits ----------------------------------------------------------------------------------


def _load_digits() -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    classes = [str(i) for i in range(10)]
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return (
        ImageData(x[tr], y[tr], classes, "digits"),
        ImageData(x[te], y[te], classes, "digits"),
    )


# ---- npz -------------------------------------------------------------------------------------


class _NpzFile:
    """One .npz image file known from its headers and its small arrays (y, classes); `x` is
    read only when asked, and only the rows asked for. `x` has any number of channels; uint8
    pixels stay uint8, others become float32 in [0, 1] (`multichannel.to_unit`)."""

    def __init__(self, path: Path) -> None:
        arrays = npz.members(path)
        if "x" not in arrays:
            raise SelfsupError(f"{path}: no 'x' array (found keys: {', '.join(arrays)})")
        x = arrays["x"]
        multichannel.check_dtype(x.dtype, f"{path}: 'x'")
        if len(x.shape) not in (3, 4) or len(x.shape) == 4 and x.shape[-1] < 1:
            raise SelfsupError(
                f"{path}: 'x' has shape {x.shape}, expected N×H×W×C (C channels) or N×H×W"
            )
        self.path, self.x = path, x
        self.image_shape = (x.shape[3] if len(x.shape) == 4 else 1, *x.shape[1:3])  # C×H×W
        self.y = self._labels(arrays["y"]) if "y" in arrays else None
        self.classes = (
            [str(c) for c in npz.read(arrays["classes"]).reshape(-1)]
            if "classes" in arrays
            else None
        )
        if self.y is not None and self.classes is not None and len(self.y):
            k = len(self.classes)
            if self.y.max() >= k:
                raise SelfsupError(f"{path}: 'y' has labels outside -1..{k - 1} ({k} classes)")

    def __len__(self) -> int:
        return self.x.shape[0]

    def _labels(self, member: npz.Member) -> np.ndarray:
        n = len(self)
        if len(member.shape) != 1 or member.shape[0] != n or member.dtype.kind not in "iu":
            raise SelfsupError(
                f"{self.path}: 'y' has shape {member.shape} and dtype {member.dtype}, "
                f"expected {n} integer labels (one per image)"
            )
        y = npz.read(member).astype(np.int64)
        if len(y) and y.min() < -1:
            raise SelfsupError(
                f"{self.path}: 'y' has label {y.min()}; labels are 0, 1, ... and -1 marks unlabeled"
            )
        return y

    def images(self, rows: np.ndarray) -> torch.Tensor:
        x = npz.read(self.x, rows)
        x = x[..., None] if x.ndim == 3 else x
        return multichannel.to_unit(x, f"{self.path}: 'x'").permute(0, 3, 1, 2).contiguous()


def _npz_labels(files: list[_NpzFile]) -> np.ndarray | None:
    """The files' labels end to end (-1 for a file without 'y'); None if none has labels."""
    if all(f.y is None for f in files):
        return None
    return np.concatenate([f.y if f.y is not None else np.full(len(f), -1) for f in files])


def _npz_data(
    files: list[_NpzFile], y: np.ndarray | None, rows: np.ndarray, name: str
) -> ImageData:
    """ImageData of the (sorted) `rows` of the files' images (and labels `y`) end to end."""
    starts = np.cumsum([0] + [len(f) for f in files])
    parts = [
        f.images(rows[(rows >= a) & (rows < b)] - a)
        for f, a, b in zip(files, starts[:-1], starts[1:], strict=True)
    ]
    labels = None if y is None else torch.from_numpy(y[rows])
    classes = next((f.classes for f in files if f.classes is not None), None)
    return ImageData(torch.cat(parts), labels, classes, name)


def _open_npz(files: list[Path]) -> list[_NpzFile]:
    opened = [_NpzFile(f) for f in files]
    for f in opened:
        if f.image_shape != opened[0].image_shape:
            raise SelfsupError(
                f"{f.path}: images are {f.image_shape} (C×H×W) but {files[0].name} has "
                f"{opened[0].image_shape}"
            )
        if f.x.dtype != opened[0].x.dtype:
            raise SelfsupError(
                f"{f.path}: pixels are {f.x.dtype} but {files[0].name} has {opened[0].x.dtype}"
            )
    return opened


def _load_npz(arg: str, spec: str, limit: int | None) -> Split:
    """As load_splits does for every source (a labeled source without a test split gets one
    held out, then `limit` keeps the stratified first train samples), but on the labels alone:
    only the images kept are ever decompressed."""
    path = Path(arg).expanduser()
    if path.is_file():
        train_files, test_file = [path], None
    elif path.is_dir():
        train_files = sorted(path.glob("train*.npz"))
        if not train_files:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise SelfsupError(f"{path}: no train*.npz files (found: {found})")
        test_file = path / "test.npz" if (path / "test.npz").is_file() else None
    else:
        raise SelfsupError(f"--data {spec}: {path} does not exist (expected an .npz or a folder)")
    files = _open_npz(train_files)
    n = sum(len(f) for f in files)
    y = _npz_labels(files)
    held = np.zeros(0, dtype=np.int64)
    if test_file is None and y is not None and (y >= 0).any() and n > 1:
        held = held_out_indices(y)
    rest = np.setdiff1d(np.arange(n), held)
    if limit is not None:
        rest_y = None if y is None else y[rest]
        rest = rest[stratified_indices(rest_y, min(limit, len(rest)), seed=None)]
    train = _npz_data(files, y, rest, spec)
    if len(held):
        test = _npz_data(files, y, held, spec)
        test.held_out = True
    elif test_file is not None:
        test_files = _open_npz([test_file])
        test = _npz_data(test_files, _npz_labels(test_files), np.arange(len(test_files[0])), spec)
        if test.classes is None:
            test.classes = train.classes
    else:
        test = None
    return train, test


# ---- image folders ---------------------------------------------------------------------------


class FolderImages(Dataset):
    """Image files decoded on demand: item i -> (uint8 3×size×size, int label), the centre
    square resized, JPEGs decoded at the smallest DCT scale that keeps `size` (`decode_square`).

    The paths are held as one bytes array (not a list of str objects), so that forked
    DataLoader workers reading them copy no memory pages (refcounts are never touched)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int) -> None:
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = os.fsdecode(self.paths[i])
        try:
            return decode_square(path, self.size), int(self.labels[i])
        except DeepPixels as e:
            first = os.fsdecode(self.paths[0])
            message = f"{e}, but {first} has 8; a folder's images must all be alike"
            raise SelfsupError(message) from None


def images_under(d: Path, recursive: bool) -> list[Path]:
    files = d.rglob("*") if recursive else d.iterdir()
    return sorted(
        p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def scan_folder(
    root: Path, classes: list[str] | None
) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Class sub-folders (those holding images) -> (paths, labels, classes); else flat images."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_class = {d.name: imgs for d in subdirs if (imgs := images_under(d, recursive=True))}
    if not by_class:
        paths = images_under(root, recursive=False)
        if not paths:
            exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
            raise SelfsupError(f"{root}: no images ({exts}) in it or in class sub-folders")
        return paths, None, classes
    classes = classes or list(by_class)
    unknown = sorted(set(by_class) - set(classes))
    if unknown:
        raise SelfsupError(f"{root}: class folders {unknown} are not among the train classes")
    paths, labels = [], []
    for name, imgs in by_class.items():
        paths += imgs
        labels += [classes.index(name)] * len(imgs)
    return paths, labels, classes


def _folder_images(
    paths: list[Path],
    labels: list[int] | None,
    classes: list[str] | None,
    size: int | None,
    name: str,
    root: Path,
    stream: bool = False,
) -> tuple[ImageData, int]:
    """Image files -> (ImageData, size): decoded into memory (by DataLoader workers) when they
    fit in IN_MEMORY_BYTES and not `stream`, else decoded on demand, holding the file list only.

    The first file says what the others must be: a TIFF or a 16-bit PNG makes the folder a
    stack folder (`multichannel.StackImages`: its channels and pixel type, uint16 as float
    [0, 1]), anything else an 8-bit RGB one (`FolderImages`); a file of another kind is one
    line naming it (a TIFF here at once, others when they are decoded)."""
    if size is None:
        size = min(*image_header(paths[0])[1:], MAX_DEFAULT_SIZE)
    y = None if labels is None else torch.tensor(labels, dtype=torch.long)
    files = [str(p) for p in paths]
    ds: Dataset
    if multichannel.is_stack(paths[0]):
        ds = multichannel.StackImages(files, labels or [-1] * len(files), size)
        per_pixel = ds.channels * ds.itemsize
    else:
        tiff = next((p for p in paths if p.suffix.lower() in STACKS), None)
        if tiff is not None:
            raise SelfsupError(
                f"{tiff}: a TIFF (read as a channel stack) among 8-bit images such as "
                f"{paths[0].name}; a folder's images must all be alike"
            )
        ds, per_pixel = FolderImages(files, labels or [-1] * len(files), size), 3
    if stream or len(ds) * per_pixel * size * size >= IN_MEMORY_BYTES:  # type: ignore[arg-type]
        return ImageData(None, y, classes, name, lazy=ds, paths=files), size
    x = decode_all(ds, desc=f"decoding {root}")
    return ImageData(x, y, classes, name, paths=files), size


def _load_folder(
    arg: str, spec: str, image_size: int | None, limit: int | None, stream: bool = False
) -> Split:
    """Split by `train/` + `test/` (or `val/`); a labeled folder without them gets its test
    split held out (as load_splits does for every source) and `limit` applied after that, all
    before any image is decoded."""
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise SelfsupError(f"--data {spec}: {root} is not a folder")
    train_root = root / "train" if (root / "train").is_dir() else root
    test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    paths, labels, classes = scan_folder(train_root, None)
    held: list[int] = []
    if train_root == root or test_root is None:
        test_root = None
        if labels is not None and len(paths) > 1:
            held = held_out_indices(np.asarray(labels)).tolist()
    rest = sorted(set(range(len(paths))) - set(held))
    if limit is not None:
        rest_labels = None if labels is None else [labels[i] for i in rest]
        rest = [rest[i] for i in stratified_indices(rest_labels, min(limit, len(rest)), seed=None)]

    def pick(idx: list[int]) -> tuple[list[Path], list[int] | None]:
        return [paths[i] for i in idx], None if labels is None else [labels[i] for i in idx]

    train, size = _folder_images(*pick(rest), classes, image_size, spec, train_root, stream)
    if held:
        test, _ = _folder_images(*pick(held), classes, size, spec, train_root, stream)
        test.held_out = True
        return train, test
    if test_root is None:
        return train, None
    test_paths, test_labels, _ = scan_folder(test_root, classes)
    return train, _folder_images(test_paths, test_labels, classes, size, spec, test_root, stream)[0]


# ---- torchvision -----------------------------------------------------------------------------


def data_root(data_dir: str | None) -> Path:
    """Torchvision root: `data_dir`, else $SELFSUP_DATA, else ~/.cache/selfsup/data."""
    return Path(data_dir or os.environ.get("SELFSUP_DATA") or "~/.cache/selfsup/data").expanduser()


def _torchvision_split(name: str, root: Path, train: bool, download: bool) -> ImageData:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name])
    if name in ("stl10", "svhn"):  # labeled 'train'/'test' splits; svhn labels are already 0..9
        kwargs: dict = {"split": "train" if train else "test"}
    else:
        kwargs = {"train": train}
    try:
        ds = cls(str(root), download=download, **kwargs)
    except (RuntimeError, OSError) as e:
        if not download:
            raise SelfsupError(
                f"{name}: not found under {root}; pass --download to fetch it"
            ) from None
        raise SelfsupError(f"{name}: download to {root} failed ({first_line(e)})") from None
    x = torch.as_tensor(np.asarray(ds.data))
    if x.ndim == 3:  # MNIST-like: N×H×W
        x = x[:, None]
    elif name in ("cifar10", "cifar100"):  # N×H×W×C
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels))
    classes = list(getattr(ds, "classes", [str(i) for i in range(10)]))
    return ImageData(x.contiguous(), y.long(), classes, name)


# ---- entry point -----------------------------------------------------------------------------


def load_splits(
    spec: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    limit: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    stream: bool = False,
) -> Split:
    """(train, test) for a `--data` spec.

    A labeled source without a test split gets one: a stratified HOLDOUT (20%) of its images,
    drawn with a fixed seed before `limit`, so that pretraining, evaluation and `embed` all see
    the same split and pretraining never sees the held-out images (`test.held_out` is True).
    test is None only for an unlabeled source without a test split.

    `limit` keeps the stratified first `limit` train samples. `image_size` resizes to a square
    (centre crop + resize): folder images always get one size, by default the first image's short
    side capped at MAX_DEFAULT_SIZE; other sources keep their size unless `image_size` is given.
    `seed` is accepted for interface stability: every current split is fixed. `stream`: folder
    images are decoded when used, never all held in memory (for one pass over a folder).
    """
    del seed
    if limit is not None and limit < 1:
        raise SelfsupError(f"--limit must be at least 1, got {limit}")
    if image_size is not None and image_size < 1:
        raise SelfsupError(f"--image-size must be at least 1, got {image_size}")
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("litdata", "wds") and arg:  # streamed: split and limited without a Subset
        from selfsup.image.data import shards, wds

        load, subset = (
            (shards.load_litdata, shards.streamed_subset)
            if kind == "litdata"
            else (wds.load_wds, wds.wds_subset)
        )
        train, test = load(arg, spec, image_size, MAX_DEFAULT_SIZE)
        if test is None and train.has_labels and len(train) > 1:  # labelled tars (cls) alone
            held = held_out_indices(train.y.numpy())  # type: ignore[union-attr]
            train, test = (
                subset(train, np.setdiff1d(np.arange(len(train)), held)),
                subset(train, held),
            )
            test.held_out = True
        if limit is not None and limit < len(train):
            train = subset(train, stratified_indices(train.y, limit, seed=None))
        return train, test
    if not (sep and kind in ("npz", "folder")) and spec.lower() not in ("digits", *TORCHVISION):
        kind, sep, arg = _path_kind(spec), ":", spec  # a bare path: what it holds says which
    if sep and kind in ("npz", "folder") and arg:
        train, test = (
            _load_npz(arg, spec, limit)
            if kind == "npz"
            else _load_folder(arg, spec, image_size, limit, stream)
        )
    elif spec.lower() == "digits":
        train, test = _load_digits()
    elif spec.lower() in TORCHVISION:
        root = data_root(data_dir)
        train, test = (_torchvision_split(spec.lower(), root, t, download) for t in (True, False))
    else:
        raise SelfsupError(f"unknown --data {spec!r}: expected one of {SPECS}, or a path")
    if test is None and train.has_labels and len(train) > 1:
        train, test = hold_out(train)
    if limit is not None:
        train = train.subset(stratified_indices(train.y, min(limit, len(train)), seed=None))
    if image_size is not None:
        train, test = (_resized(d, image_size) for d in (train, test))
    return train, test


def _path_kind(spec: str) -> str:
    """'npz' or 'folder' for an existing path given without a prefix ('' if neither)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        return "npz"
    if path.is_dir():
        return "npz" if any(path.glob("train*.npz")) else "folder"
    return ""


def held_out_indices(y: np.ndarray) -> np.ndarray:
    """The sorted indices of a stratified HOLDOUT of labels `y` (at least one), fixed seed."""
    return stratified_indices(y, max(1, round(len(y) * HOLDOUT)), seed=0)


def hold_out(data: ImageData) -> tuple[ImageData, ImageData]:
    """(the rest, a stratified HOLDOUT of `data` as a test split), the same every time."""
    held = held_out_indices(data.y.numpy())  # type: ignore[union-attr]
    rest = np.setdiff1d(np.arange(len(data)), held)
    test = data.subset(held)
    test.held_out = True
    return data.subset(rest), test


def _resized(data: ImageData | None, size: int) -> ImageData | None:
    if data is None or data.x is None or data.image_size == (size, size):
        return data
    return ImageData(
        square_resize(data.x, size),
        data.y,
        data.classes,
        data.name,
        held_out=data.held_out,
        paths=data.paths,
    )
