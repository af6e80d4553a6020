"""A finished image run: its encoder (saved as safetensors, rebuilt from config.yaml), the data as
the encoder sees it, and the features of a dataset under it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.core.errors import SelfsupError
from selfsup.core.run import ENCODER, atomic_save, input_shape, read_config
from selfsup.engine.device import resolve_device
from selfsup.image.data import ImageData, adapt_images, load_splits, stratified_indices
from selfsup.image.evaluation.features import extract_features
from selfsup.image.models import Encoder


def export_encoder(encoder: torch.nn.Module, path: Path) -> None:
    """Encoder weights as safetensors (atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(tensors, tmp))


def load_encoder(run: str | Path) -> Encoder:
    """The trained encoder of a run (eval mode), rebuilt from its config and safetensors weights."""
    from safetensors.torch import load_file

    config = read_config(run)
    weights = Path(run) / ENCODER
    if not weights.is_file():
        raise SelfsupError(f"{weights} is missing: the run has not finished an epoch yet")
    encoder = Encoder(**config["encoder"])
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise SelfsupError(f"{weights} is not a readable safetensors file ({e})") from None
    encoder.load_state_dict(state)
    return encoder.eval()


def load(run: str | Path) -> Encoder:
    """The pretrained encoder of a run: uint8 or [0, 1] float images B×C×H×W -> features B×D."""
    return load_encoder(run)


def embed(
    run: str | Path,
    data: str | None = None,
    *,
    split: str = "train",
    data_dir: str | None = None,
    download: bool = False,
    limit: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N×D float32) and labels (or None) of a dataset under a run's encoder."""
    encoder = load(run)
    dataset = dataset_for(run, data, split, data_dir, download, limit, stream=True)
    features = extract_features(
        encoder, dataset, batch_size=batch_size, device=resolve_device(device)
    )
    labels = dataset.y.numpy() if dataset.y is not None else None
    return features, labels


def _folder_size(spec: str, run_config: dict) -> int | None:
    """Folder images are resized to the size the encoder was trained on."""
    return run_config["dataset"]["image_size"][0] if spec.startswith("folder:") else None


def dataset_for(
    run: str | Path,
    data: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    download: bool = False,
    limit: int | None = None,
    stream: bool = False,
) -> ImageData:
    """A split of `data` (default: the run's own) as the run's encoder sees it (channels and
    size converted); `limit` keeps a stratified first N of the split, test split included;
    `stream`: a folder's images are decoded as they are used (one pass, bounded memory)."""
    if split not in ("train", "test"):
        raise SelfsupError(f"--split {split!r} is unknown; expected train or test")
    run_config = read_config(run)
    spec = data or run_config["data"]
    train, test = load_splits(
        spec,
        data_dir=data_dir or run_config.get("data_dir"),
        download=download,
        limit=limit,
        image_size=_folder_size(spec, run_config),
        stream=stream,
    )
    if split == "test" and test is None:
        raise SelfsupError(f"--data {spec} has no test split")
    dataset = train if split == "train" else test
    if split == "test" and limit is not None and len(test) > limit:  # type: ignore[arg-type]
        dataset = test.subset(stratified_indices(test.y, limit, seed=None))  # type: ignore[union-attr]
    return _adapt(dataset, input_shape(run_config))  # type: ignore[arg-type]


def _adapt(data: ImageData, shape: tuple[int, int, int]) -> ImageData:
    """Transfer: convert another dataset's images to the channels and size the encoder saw."""
    if (data.channels, *data.image_size) == tuple(shape):
        return data
    if data.x is None:
        lazy = _AdaptedImages(data.lazy, shape)
        return ImageData(None, data.y, data.classes, data.name, lazy=lazy, paths=data.paths)
    x = adapt_images(data.x, shape[0], (shape[1], shape[2]))
    return ImageData(x, data.y, data.classes, data.name, paths=data.paths)


class _AdaptedImages(torch.utils.data.Dataset):
    """A lazy dataset's images converted, one at a time, to the encoder's channels and size."""

    def __init__(self, lazy: Any, shape: tuple[int, int, int]) -> None:
        self.lazy, self.shape = lazy, shape

    def __len__(self) -> int:
        return len(self.lazy)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.lazy[i]
        return adapt_images(x[None], self.shape[0], (self.shape[1], self.shape[2]))[0], y
