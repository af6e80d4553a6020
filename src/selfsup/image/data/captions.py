"""Image–caption pairs for CLIP: caption npz files, CSV/TSV/JSONL files, or templated labels.

`--data` for `clip` is one of
- `npz:FILE` whose file holds `x` and `captions` (N, or N×K strings: K captions per image,
  e.g. ../shared/data/flickr8k/pairs-64px.npz), optionally `filenames`;
- `captions:FILE.csv|tsv|jsonl`: an image path and a caption per row (a header row naming the
  `image` and `caption` columns; JSONL objects with `image` and `caption` or `captions`); rows of
  the same image are its several captions; paths are relative to the file's folder and must
  stay inside it (not absolute, no `..`: link an outside image folder in);
- any labeled dataset (`digits`, `cifar10`, `npz:DIR`, `folder:PATH`, ...): each class name fills
  prompt templates ("a photo of a {}.") into the captions of its images.

Every image belongs to a caption *group*: its own for caption files, its class for templated
labels. `CaptionData.images.y` holds the group, `captions[group]` its captions, so one caption
per image is drawn per training step from the group's list.
"""

from __future__ import annotations

import csv
import io
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from selfsup.core.errors import SelfsupError
from selfsup.core.jsonl import json_objects
from selfsup.image.data.decode import decode_image
from selfsup.image.data.images import ImageData
from selfsup.image.data.sources import MAX_DEFAULT_SIZE, load_splits, stratified_indices
from selfsup.image.data.transforms import square_resize

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of the {}.",
    "a photo of the small {}.",
    "a picture of a {}.",
)
CAPTION_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
IMAGE_COLUMNS = ("image", "filename", "file", "path")
CAPTION_COLUMNS = ("caption", "text")


@dataclass
class CaptionData:
    """Images whose `y` is a caption group, and the captions of every group."""

    images: ImageData
    captions: list[list[str]]
    names: list[str] | None = None  # an image's file name, for showing retrieval results
    templated: bool = False  # groups are classes (captions from templates), not single images
    skipped: list[str] = field(default_factory=list)  # why each skipped item was skipped

    def caption_pairs(self) -> tuple[list[str], np.ndarray]:
        """Every caption of every image once, and the image index of each (for retrieval)."""
        groups = self.images.y.numpy()  # type: ignore[union-attr]
        texts, owners = [], []
        for i, group in enumerate(groups):
            texts += self.captions[group]
            owners += [i] * len(self.captions[group])
        return texts, np.asarray(owners, dtype=np.int64)


class BadItems:
    """Collects what is wrong with a file's items; stops at the end unless skipping is allowed."""

    def __init__(self, source: str, unit: str) -> None:
        self.source, self.unit, self.reasons, self.total = source, unit, [], 0

    def add(self, reason: str) -> None:
        self.reasons.append(reason)

    def check(self, skip_bad: bool) -> list[str]:
        if not self.reasons:
            return []
        count = f"{len(self.reasons)} of {self.total} {self.unit}"
        if not skip_bad:
            raise SelfsupError(
                f"{self.source}: {count} are bad (first: {self.reasons[0]}); fix them or pass "
                "--skip-bad to skip them"
            )
        warnings.warn(
            f"{self.source}: skipped {count} (first: {self.reasons[0]})", UserWarning, stacklevel=3
        )
        return self.reasons


def parse_templates(spec: str | None) -> list[str]:
    """Prompt templates from `--templates`: a text file (one per line) or a '|'-separated list.

    Each must hold `{}` exactly once (where the class name goes). None -> DEFAULT_TEMPLATES.
    """
    if spec is None:
        return list(DEFAULT_TEMPLATES)
    path = Path(spec).expanduser()
    items = path.read_text().splitlines() if path.is_file() else spec.split("|")
    templates = [t.strip() for t in items if t.strip()]
    if not templates:
        raise SelfsupError(f"--templates {spec!r}: no templates given")
    for t in templates:
        if t.count("{}") != 1:
            raise SelfsupError(
                f"--templates: {t!r} must contain '{{}}' exactly once (where the class name goes)"
            )
    return templates


def parse_classes(spec: str | None, dataset_classes: list[str] | None, data: str) -> list[str]:
    """Class names from `--classes` (a file, one per line, or a comma list), else the dataset's.

    The list must have one name per class of the dataset, in label order.
    """
    if spec is None:
        if not dataset_classes:
            raise SelfsupError(f"--data {data} has no class names; pass them with --classes")
        return [readable(c) for c in dataset_classes]
    path = Path(spec).expanduser()
    items = path.read_text().splitlines() if path.is_file() else spec.split(",")
    names = [c.strip() for c in items if c.strip()]
    if dataset_classes is not None and len(names) != len(dataset_classes):
        shown = ", ".join(dataset_classes[:4]) + (", ..." if len(dataset_classes) > 4 else "")
        raise SelfsupError(
            f"--classes gives {len(names)} names but --data {data} has {len(dataset_classes)} "
            f"classes ({shown})"
        )
    return names


def readable(name: str) -> str:
    """A class name as words: 'maple_tree' -> 'maple tree'."""
    return " ".join(name.replace("_", " ").split())


# ---- sources ---------------------------------------------------------------------------------


def _is_caption_npz(spec: str) -> bool:
    kind, _, arg = spec.partition(":")
    path = Path(arg).expanduser()
    if kind != "npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return isinstance(z, np.lib.npyio.NpzFile) and "captions" in z.files
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return False  # load_splits reports it


def _caption_file(spec: str) -> Path | None:
    kind, sep, arg = spec.partition(":")
    path = Path(arg if sep and kind == "captions" else spec).expanduser()
    if path.suffix.lower() not in CAPTION_SUFFIXES:
        if sep and kind == "captions":
            raise SelfsupError(f"--data {spec}: expected a .csv, .tsv or .jsonl caption file")
        return None
    if not path.is_file():
        raise SelfsupError(f"--data {spec}: caption file {path} does not exist")
    return path


def _read_caption_npz(spec: str, skip_bad: bool) -> CaptionData:
    path = Path(spec.partition(":")[2]).expanduser()
    train, _ = load_splits(spec)  # x validated by the generic npz reader
    with np.load(path, allow_pickle=False) as z:
        raw = z["captions"]
        names = [str(f) for f in z["filenames"]] if "filenames" in z.files else None
    if raw.dtype.kind not in "US" or raw.ndim not in (1, 2) or len(raw) != len(train):
        raise SelfsupError(
            f"{path}: 'captions' has shape {raw.shape} and dtype {raw.dtype}, expected "
            f"{len(train)} strings or {len(train)}×K strings (K captions per image)"
        )
    raw = raw.astype(str).reshape(len(raw), -1)
    bad = BadItems(str(path), "captions")
    keep, captions = [], []
    for i, row in enumerate(raw):
        texts = [" ".join(t.split()) for t in row]
        bad.total += len(texts)
        for k, t in enumerate(texts):
            if not t:
                bad.add(f"image {i} caption {k} is empty")
        if any(texts):
            keep.append(i)
            captions.append([t for t in texts if t])
    skipped = bad.check(skip_bad)
    images = ImageData(train.x[keep], torch.arange(len(keep)), None, spec)  # type: ignore[index]
    names = [names[i] for i in keep] if names else None
    return CaptionData(images, captions, names, skipped=skipped)


def _caption_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, image path, caption) of every row ("" where a field is missing)."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SelfsupError(f"{path}: not UTF-8 text (byte {e.start})") from None
    delimiter = CAPTION_SUFFIXES[path.suffix.lower()]
    if delimiter is None:
        for number, record in json_objects(text, path, "{path}, line {line}"):
            image = record.get("image", "")
            caps = record["captions"] if "captions" in record else [record.get("caption", "")]
            caps = (caps or [""]) if isinstance(caps, list) else [caps]
            rows += [(number, str(image or ""), str(c or "")) for c in caps]
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    image_col = next((c for c in IMAGE_COLUMNS if c in header), None)
    caption_col = next((c for c in CAPTION_COLUMNS if c in header), None)
    if image_col is None or caption_col is None:
        raise SelfsupError(
            f"{path}: the header row {header} needs an image column ({' or '.join(IMAGE_COLUMNS)}) "
            f"and a caption column ({' or '.join(CAPTION_COLUMNS)})"
        )
    for row in reader:
        rows.append((reader.line_num, row.get(image_col) or "", row.get(caption_col) or ""))
    return rows


def _read_caption_file(path: Path, spec: str, skip_bad: bool, size: int | None) -> CaptionData:
    bad = BadItems(str(path), "rows")
    rows = _caption_rows(path)
    bad.total = len(rows)
    by_image: dict[str, list[str]] = {}
    for number, image, caption in rows:
        caption = " ".join(caption.split())
        file = path.parent / image
        _check_inside(path, number, image)
        if not image:
            bad.add(f"line {number} has no image")
        elif not file.is_file():
            bad.add(f"line {number}: image {image} not found")
        elif not caption:
            bad.add(f"line {number}: empty caption")
        else:
            by_image.setdefault(image, []).append(caption)
    files, x = [], []
    for name in by_image:
        try:
            image = decode_image(path.parent / name, size)
        except SelfsupError as e:
            bad.reasons += [f"line {n}: {e}" for n, im, _ in rows if im == name]
            continue
        if size is None:  # the first image's short side, capped, as for image folders
            size = min(*image.shape[1:], MAX_DEFAULT_SIZE)
        files.append(name)
        x.append(square_resize(image, size))
    skipped = bad.check(skip_bad)
    if not files:
        raise SelfsupError(f"{path}: no usable image–caption rows")
    images = ImageData(torch.stack(x), torch.arange(len(files)), None, spec)
    return CaptionData(images, [by_image[f] for f in files], files, skipped=skipped)


def _check_inside(path: Path, number: int, image: str) -> None:
    """One line for an image path that may leave the caption file's folder (absolute, or with a
    `..`): a caption file names images beside it, not anywhere on the machine. A folder linked
    into the caption file's folder may be used."""
    if Path(image).is_absolute() or ".." in Path(image).parts:
        raise SelfsupError(
            f"{path}, line {number}: image {image!r} may lie outside the caption file's folder "
            f"{path.parent}; paths must be relative and stay inside it (no '..'; link an outside "
            "folder in)"
        )


def _templated(data: ImageData, templates: list[str], classes: list[str] | None) -> CaptionData:
    names = parse_classes(None, data.classes, data.name) if classes is None else classes
    captions = [[t.format(name) for t in templates] for name in names]
    if data.y is not None and (data.y < 0).any():  # unlabeled images have no caption
        data = data.subset(torch.nonzero(data.y >= 0).flatten())
    return CaptionData(data, captions, templated=True)


def load_captions(
    spec: str,
    *,
    templates: str | None = None,
    skip_bad: bool = False,
    holdout: float = 0.2,
    data_dir: str | None = None,
    download: bool = False,
    limit: int | None = None,
    image_size: int | None = None,
) -> tuple[CaptionData, CaptionData | None]:
    """(train, held-out) image–caption data for a `--data` spec (see the module docstring).

    Caption sources have no standard split: the last `holdout` fraction of their images is held
    out (Flickr8k's 1,000-image subset: the last 200). Labeled datasets keep their own test split
    (None without one). `limit` keeps the first `limit` training images.
    """
    if not 0 <= holdout < 1:
        raise SelfsupError(f"--caption-holdout must be in [0, 1), got {holdout}")
    template_list = parse_templates(templates)
    file = _caption_file(spec)
    if file is not None or _is_caption_npz(spec):
        if image_size is not None and image_size < 1:
            raise SelfsupError(f"--image-size must be at least 1, got {image_size}")
        if file is not None:
            data = _read_caption_file(file, spec, skip_bad, image_size)
        else:
            data = _read_caption_npz(spec, skip_bad)
            if image_size is not None:
                x = square_resize(data.images.x, image_size)  # type: ignore[arg-type]
                data.images = ImageData(x, data.images.y, None, spec)
        train, test = _split_last(data, holdout)
    else:
        train_images, test_images = load_splits(
            spec, data_dir=data_dir, download=download, image_size=image_size
        )
        if not train_images.has_labels or not train_images.classes:
            raise SelfsupError(
                f"--data {spec} has no class names for template captions; clip needs image–"
                "caption pairs (npz:FILE with 'captions', captions:FILE.tsv) or a labeled dataset"
            )
        train = _templated(train_images, template_list, None)
        test = (
            _templated(test_images, template_list, parse_classes(None, train_images.classes, spec))
            if test_images is not None and test_images.has_labels
            else None
        )
    if limit is not None:
        if limit < 1:
            raise SelfsupError(f"--limit must be at least 1, got {limit}")
        train = _first(train, limit)
    return train, test


def _subset(data: CaptionData, keep: np.ndarray) -> CaptionData:
    """Images `keep` with their own groups renumbered (caption files) or kept (templates)."""
    images = data.images.subset(keep)
    names = [data.names[i] for i in keep] if data.names else None
    if data.templated:
        return CaptionData(images, data.captions, names, True, data.skipped)
    groups = images.y.tolist()  # type: ignore[union-attr]
    images.y = torch.arange(len(keep))
    return CaptionData(images, [data.captions[g] for g in groups], names, False, data.skipped)


def _split_last(data: CaptionData, holdout: float) -> tuple[CaptionData, CaptionData | None]:
    n = len(data.images)
    held = int(round(n * holdout))
    if held == 0:
        return data, None
    if held >= n:
        raise SelfsupError(f"{data.images.name}: {n} images are too few to hold out {held}")
    return _subset(data, np.arange(n - held)), _subset(data, np.arange(n - held, n))


def _first(data: CaptionData, n: int) -> CaptionData:
    if n >= len(data.images):
        return data
    if data.templated:  # stratified, like --limit for image datasets
        return _subset(data, stratified_indices(data.images.y, n, seed=None))
    return _subset(data, np.arange(n))
