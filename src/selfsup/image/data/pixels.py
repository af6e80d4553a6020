"""A run's pixel type: what its raw pixels are and how they became the encoder's [0, 1] input,
x = (raw - offset) / scale.

Pretraining records it in the run's dataset info (`dataset.pixels` in config.yaml), so an
export says it without reading the data again; a run written before that was recorded has its
data read at export, as then (`run_pixels`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.core.errors import SelfsupError
from selfsup.image.data.multichannel import file_dtype, pixel_scale


def pixel_type(dtype: np.dtype | None) -> dict[str, Any]:
    """{"dtype", "offset", "scale"} of pixels of `dtype` (see `multichannel.pixel_scale`); all
    None when the type is unknown."""
    if dtype is None:
        return {"dtype": None, "offset": None, "scale": None}
    offset, scale = pixel_scale(dtype)
    return {"dtype": np.dtype(dtype).name, "offset": offset, "scale": scale}


def data_pixels(spec: str, data_dir: str | None, loaded: torch.dtype) -> dict[str, Any]:
    """At pretraining: the pixel type of `--data spec`, whose images loaded as `loaded`.

    uint8 images were read as they are (uint8); float32 ones were scaled from the source's own
    type, read from its first file or array (None when that is not known, or contradicts)."""
    if loaded == torch.uint8:
        return pixel_type(np.dtype(np.uint8))
    dtype = source_dtype(spec, data_dir)
    return pixel_type(None if dtype == np.uint8 else dtype)


def run_pixels(config: dict[str, Any]) -> dict[str, Any]:
    """A run's pixel type: the one recorded at pretraining; for a run written before it was
    recorded, read from the run's data now (None when the data is gone)."""
    recorded = config["dataset"].get("pixels")
    if recorded is not None:
        return {k: recorded.get(k) for k in ("dtype", "offset", "scale")}
    return pixel_type(source_dtype(config.get("data", ""), config.get("data_dir")))


def source_dtype(spec: str, data_dir: str | None) -> np.dtype | None:
    """The pixel type of the images under `spec` before selfsup scales them (the first file's
    or array's; None when the data cannot be read)."""
    from selfsup.image.data import npz, sources

    kind, sep, arg = spec.partition(":")
    if not (sep and kind in ("npz", "folder", "litdata", "wds")):
        if spec.lower() in ("digits", *sources.TORCHVISION):
            return np.dtype(np.uint8)
        kind, arg = sources._path_kind(spec), spec  # noqa: SLF001 - a bare path: as load_splits
    path = Path(arg).expanduser()
    try:
        if kind == "npz":
            files = [path] if path.is_file() else sorted(path.glob("train*.npz"))
            return npz.members(files[0])["x"].dtype if files else None
        if kind == "folder" and path.is_dir():
            root = path / "train" if (path / "train").is_dir() else path
            return file_dtype(sources.scan_folder(root, None)[0][0])
        if kind in ("litdata", "wds"):  # the first sample's stored bytes
            from selfsup.image.data.shards import load_litdata, sample_dtype
            from selfsup.image.data.wds import load_wds

            load = load_litdata if kind == "litdata" else load_wds
            images = load(arg, spec, 1, 1)[0].lazy
            return sample_dtype(images.encoded(0), spec)  # type: ignore[union-attr]
    except (SelfsupError, OSError, KeyError):
        return None
    return None
