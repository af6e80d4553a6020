"""From a few labels to a classifier that labels the rest.

`classify(RUN, labels, out)`: the run's frozen encoder and a multinomial logistic regression on
its (standardised) features, C cross-validated on the labels when every class has two, saved as
ONE safetensors file (encoder, feature statistics, linear head; architecture and class names in
its metadata). `predict(CLASSIFIER, images, out)`: streams image files in batches (memory bounded
by the batch, whatever the folder's size) and writes path, label, confidence, one probability
per class, and a flag for low confidence.

Labels are a CSV with a header `path,label` (image files, relative to the CSV's folder) or
`index,label` (positions in the run's training images), or `folder:PATH` whose class
sub-folders name the labels.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from selfsup.errors import SelfsupError

FORMAT = "selfsup-classifier-1"
LOW_CONFIDENCE = 0.5  # a prediction below this probability is flagged for a person to check


def read_labels(spec: str) -> tuple[list[str | int], list[str], Path | None]:
    """(ids: paths or indices, labels, the CSV's folder) from a CSV or `folder:PATH`."""
    if spec.startswith("folder:"):
        from selfsup.data.sources import scan_folder

        root = Path(spec[len("folder:") :]).expanduser()
        if not root.is_dir():
            raise SelfsupError(f"--labels {spec}: {root} is not a folder")
        paths, codes, classes = scan_folder(root, None)
        if codes is None:
            raise SelfsupError(f"--labels {spec}: no class sub-folders to take labels from")
        return [str(p) for p in paths], [classes[c] for c in codes], None  # type: ignore[index]
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SelfsupError(f"--labels {path}: cannot read it as text ({e})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:2]] not in (
        ["path", "label"],
        ["index", "label"],
    ):
        raise SelfsupError(f"{path}:1: expected the header path,label or index,label")
    by_index = rows[0][0].strip().lower() == "index"
    ids: list[str | int] = []
    labels: list[str] = []
    seen: dict[str | int, int] = {}
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[1].strip():
            raise SelfsupError(f"{path}:{number}: expected two values, an image and its label")
        key: str | int = row[0].strip()
        if by_index:
            if not str(key).isdigit():
                raise SelfsupError(f"{path}:{number}: index {key!r} is not a whole number")
            key = int(key)
        else:
            file = Path(key) if Path(key).is_absolute() else path.parent / key
            if not file.is_file():
                raise SelfsupError(f"{path}:{number}: image {key} does not exist")
            key = str(file)
        if key in seen:
            raise SelfsupError(f"{path}:{number}: {key} is listed twice (first on row {seen[key]})")
        seen[key] = number
        ids.append(key)
        labels.append(row[1].strip())
    if len(set(labels)) < 2:
        raise SelfsupError(
            f"{path}: needs labels of at least two classes, found {sorted(set(labels))}"
        )
    return ids, labels, path.parent


def load_image_files(paths: list[str], shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 N×C×H×W of image files at the encoder's channels and size."""
    from selfsup.data.sources import decode_image
    from selfsup.data.transforms import adapt_images, square_resize

    channels, h, _ = shape
    return adapt_images(
        torch.stack([square_resize(decode_image(p), h) for p in paths]), channels, (h, h)
    )


def classify(
    run: str | Path, labels: str, out: str | Path, *, data: str | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Train the classifier on the labeled images and save it to `out` (one file)."""
    from selfsup import run as rundir
    from selfsup.api import dataset_for, load
    from selfsup.data import ImageData
    from selfsup.device import resolve_device
    from selfsup.evaluation import extract_features
    from selfsup.evaluation.probes import fit_probe

    ids, names, _ = read_labels(labels)
    encoder, device = load(run), resolve_device(device)
    config = rundir.read_config(run)
    shape = rundir.input_shape(config)
    if isinstance(ids[0], int):
        images = dataset_for(run, data)
        bad = next((i for i in ids if i >= len(images)), None)  # type: ignore[operator]
        if bad is not None:
            raise SelfsupError(f"--labels {labels}: index {bad} is past the {len(images)} images")
        x = images.images(torch.as_tensor(ids))
    else:
        x = load_image_files([str(i) for i in ids], shape)  # type: ignore[arg-type]
    features = extract_features(encoder, ImageData(x, None, None, labels), device=device)
    classes = sorted(set(names))
    y = np.array([classes.index(n) for n in names])
    probe = fit_probe(features, y)
    head_w, head_b = probe.fit.weight.detach().float(), probe.fit.bias.detach().float()
    if head_w.shape[0] == 1:  # two classes: one logit against a fixed 0
        head_w, head_b = (
            torch.cat([torch.zeros_like(head_w), head_w]),
            torch.cat([torch.zeros_like(head_b), head_b]),
        )
    tensors = {
        f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()
    }
    tensors.update(
        {
            "feature.mean": probe.mean,
            "feature.std": probe.std,
            "head.weight": head_w.cpu(),
            "head.bias": head_b.cpu(),
        }
    )
    metadata = {
        "format": FORMAT,
        "selfsup_encoder": json.dumps(encoder.config),
        "classes": json.dumps(classes),
        "input_shape": json.dumps(list(shape)),
        "C": str(probe.fit.C),
        "run": str(run),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    train_accuracy = float(np.mean(probe.predict(features) == y))
    return {
        "out": str(out),
        "classes": classes,
        "labels": len(y),
        "C": probe.fit.C,
        "train_accuracy": train_accuracy,
    }


class Classifier(torch.nn.Module):
    """A saved classifier: uint8 images N×C×H×W (the input shape) -> class probabilities."""

    def __init__(self, path: str | Path) -> None:
        from selfsup.models import Encoder

        super().__init__()
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no dict)
        except Exception as e:  # safetensors raises several types for a damaged file
            raise SelfsupError(f"{path}: not a readable classifier file ({e})") from None
        if meta.get("format") != FORMAT:
            raise SelfsupError(f"{path}: not a selfsup classifier (made by `selfsup classify`)")
        self.classes: list[str] = json.loads(meta["classes"])
        self.input_shape: tuple[int, int, int] = tuple(json.loads(meta["input_shape"]))  # type: ignore[assignment]
        self.encoder = Encoder(**json.loads(meta["selfsup_encoder"]))
        self.encoder.load_state_dict(
            {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}
        )
        self.register_buffer("mean", tensors["feature.mean"])
        self.register_buffer("std", tensors["feature.std"])
        self.head = torch.nn.Linear(len(self.mean), len(self.classes))
        self.head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head((self.encoder(x).float() - self.mean) / self.std), dim=1)


def image_files(spec: str) -> list[str]:
    """The image files of `folder:PATH` (or a plain folder path), recursively, sorted."""
    from selfsup.data.sources import images_under

    root = Path(spec[len("folder:") :] if spec.startswith("folder:") else spec).expanduser()
    if not root.is_dir():
        raise SelfsupError(f"{spec}: not a folder of images")
    files = [str(p) for p in images_under(root, recursive=True)]
    if not files:
        raise SelfsupError(f"{spec}: no images in it")
    return files


def predict(
    classifier: str | Path,
    images: str,
    out: str | Path,
    *,
    batch_size: int = 256,
    threshold: float = LOW_CONFIDENCE,
    device: str = "auto",
) -> dict[str, Any]:
    """Label every image file under `images`; writes the CSV `out` batch by batch."""
    from tqdm.auto import tqdm

    from selfsup.device import resolve_device

    model = Classifier(classifier).to(resolve_device(device))
    files = image_files(images)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flagged = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["path", "label", "confidence", *(f"p_{c}" for c in model.classes), "low_confidence"]
        )
        for start in tqdm(range(0, len(files), batch_size), desc="predict", disable=None):
            batch = files[start : start + batch_size]
            x = load_image_files(batch, model.input_shape).to(model.mean.device)
            probs = model(x).cpu().numpy()
            for path, p in zip(batch, probs, strict=True):
                low = bool(p.max() < threshold)
                flagged += low
                writer.writerow(
                    [
                        path,
                        model.classes[int(p.argmax())],
                        f"{p.max():.4f}",
                        *(f"{v:.4f}" for v in p),
                        int(low),
                    ]
                )
    return {"out": str(out), "images": len(files), "low_confidence": flagged}
