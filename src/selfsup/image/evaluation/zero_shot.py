"""Zero-shot classification from label text (CLIP): class names × prompt templates -> classifier.

Each class's weight is the mean of its L2-normalised prompt embeddings ("a photo of a {}." with
the class name filled in), normalised again; an image is assigned the class of highest cosine
similarity. No labeled image is seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.engine.device import resolve_device
from selfsup.image.data import ImageData, load_splits, stratified_indices


def zero_shot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """K×D class weights: per class, the normalised mean of its normalised prompt embeddings."""
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = F.normalize(encode_text(prompts).float(), dim=-1)
    per_class = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def topk_accuracy(
    image_emb: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    classifier: torch.Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy (%) of cosine-similarity predictions; k above the class count is skipped."""
    image = F.normalize(torch.as_tensor(np.asarray(image_emb), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    logits = image @ classifier.float().T
    out = {}
    for k in ks:
        if k <= classifier.shape[0]:
            top = logits.topk(k, dim=1).indices
            out[f"top{k}"] = 100 * (top == y[:, None]).any(dim=1).double().mean().item()
    return out


def zero_shot_evaluation(
    run: str | Path,
    data: str | None = None,
    *,
    classes: str | None = None,
    templates: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    download: bool = False,
    limit: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy of a clip run on a labeled dataset's `split`.

    `classes` and `templates` take the `--classes`/`--templates` forms (a file or a comma /
    '|'-separated list); by default the dataset's class names and the run's templates. Writes
    RUN/eval/DATA/zero_shot.json.
    """
    from selfsup.image.data.captions import parse_classes, parse_templates
    from selfsup.image.methods.clip import load_clip

    run = Path(run)
    config = rundir.read_config(run)
    spec = data or config["data"]
    template_list = parse_templates(templates if templates is not None else config.get("templates"))
    model = load_clip(run)
    images = _labeled_split(spec, split, data_dir or config.get("data_dir"), download, limit)
    names = parse_classes(classes, images.classes, spec)
    model.to(resolve_device(device))
    weights = zero_shot_classifier(model.encode_texts, names, template_list)
    image_emb = model.encode_images(images.x, batch_size)  # type: ignore[arg-type]
    labels = images.y
    results: dict[str, Any] = {
        "run": str(run),
        "data": spec,
        "split": split,
        "images": len(images),
        "classes": names,
        "templates": template_list,
        **topk_accuracy(image_emb, labels, weights.cpu()),
        "chance_top1": 100 / len(names),
    }
    out = rundir.inside_run(run, "eval", rundir.slug(spec))
    out.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_text(out / "zero_shot.json", json.dumps(results, indent=2) + "\n")
    results["out"] = str(out / "zero_shot.json")
    return results


def _labeled_split(
    spec: str, split: str, data_dir: str | None, download: bool, limit: int | None
) -> ImageData:
    if split not in ("train", "test"):
        raise SelfsupError(f"--split {split!r} is unknown; expected train or test")
    train, test = load_splits(spec, data_dir=data_dir, download=download, limit=limit)
    images = train if split == "train" else test
    if images is None:
        raise SelfsupError(f"--data {spec} has no test split; pass --split train")
    if images.x is None or not images.has_labels or (images.y < 0).any():  # type: ignore[operator]
        raise SelfsupError(f"--data {spec}: zero-shot accuracy needs labeled in-memory images")
    if limit is not None and split == "test":
        images = images.subset(stratified_indices(images.y, min(limit, len(images)), seed=None))
    return images
