"""`selfsup select RUN --budget N`: which N images to label, chosen from the run's embeddings.

Strategies (none sees a label):
- `random`: a uniform sample (the baseline a user would otherwise take);
- `kcenter`: the greedy k-center coreset (Sener & Savarese, 2018): each pick is the image
  farthest from every image picked so far, so the picks cover the embedding space;
- `typiclust` (Hacohen, Dekel & Weinshall, 2022): cluster the embeddings into N clusters and
  take the most *typical* image of each (the highest inverse mean distance to its nearest
  neighbours in the cluster), largest clusters first: typical and diverse, which is what helps
  with very few labels.
Distances are between L2-normalised embeddings (cosine geometry).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.core.errors import SelfsupError

STRATEGIES = ("typiclust", "kcenter", "random")
TYPICALITY_NEIGHBOURS = 20  # TypiClust's k for the typicality of a point
MIN_CLUSTER = 5  # TypiClust skips clusters smaller than this while larger ones remain


def choose(
    features: np.ndarray, budget: int, strategy: str = "typiclust", seed: int = 0
) -> np.ndarray:
    """Indices (in the order picked) of `budget` rows of N×D `features` to label."""
    if strategy not in STRATEGIES:
        raise SelfsupError(
            f"--strategy {strategy!r} is unknown; expected one of {', '.join(STRATEGIES)}"
        )
    n = len(features)
    if not 1 <= budget <= n:
        raise SelfsupError(f"--budget must be between 1 and the {n} images, got {budget}")
    z = unit_rows(features)
    if strategy == "random":
        return np.random.default_rng(seed).choice(n, budget, replace=False)
    if strategy == "kcenter":
        return kcenter(z, budget, seed)
    return typiclust(z, budget, seed)


def unit_rows(features: np.ndarray) -> np.ndarray:
    z = np.asarray(features, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def kcenter(z: np.ndarray, budget: int, seed: int = 0) -> np.ndarray:
    """Greedy k-center from a seeded random first pick: next = argmax of the distance to the
    nearest pick so far (torch for the N×D distance updates)."""
    x = torch.from_numpy(z)
    first = int(np.random.default_rng(seed).integers(len(z)))
    picks = [first]
    nearest = torch.cdist(x, x[first : first + 1]).squeeze(1)
    for _ in range(budget - 1):
        nearest[picks] = -1  # never pick twice (ties between duplicates included)
        pick = int(nearest.argmax())
        picks.append(pick)
        nearest = torch.minimum(nearest, torch.cdist(x, x[pick : pick + 1]).squeeze(1))
    return np.asarray(picks)


def typiclust(z: np.ndarray, budget: int, seed: int = 0) -> np.ndarray:
    """TypiClust: k-means into `budget` clusters, then the most typical image of each cluster,
    largest clusters first (clusters under MIN_CLUSTER images only when nothing else is left)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    kind = KMeans if budget <= 50 else MiniBatchKMeans  # the paper's choice for large budgets
    labels = kind(n_clusters=budget, n_init=1, random_state=seed).fit_predict(z)
    sizes = np.bincount(labels, minlength=budget)
    order = sorted(range(budget), key=lambda c: (sizes[c] < MIN_CLUSTER, -sizes[c], c))
    picks = []
    for cluster in order:
        members = np.flatnonzero(labels == cluster)
        if len(members):
            picks.append(int(members[np.argmax(typicality(z[members]))]))
    if len(picks) < budget:  # k-means left a cluster empty: fill up with k-center picks
        chosen = set(picks)
        picks += [i for i in kcenter(z, len(z), seed) if i not in chosen][: budget - len(picks)]
    return np.asarray(picks)


def typicality(z: np.ndarray, k: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """1 / mean distance to the k nearest other points (all of them when fewer)."""
    if len(z) == 1:
        return np.ones(1)
    d = torch.cdist(torch.from_numpy(z), torch.from_numpy(z))
    k = min(k, len(z) - 1)
    nearest = d.topk(k + 1, largest=False).values[:, 1:]  # drop the point itself
    return (1 / (nearest.mean(dim=1) + 1e-8)).numpy()


def select(
    run: str | Path,
    budget: int,
    *,
    strategy: str = "typiclust",
    data: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Choose `budget` training images of `data` (default: the run's own) to label; writes
    a CSV (rank, index, path where the images are files) and a contact sheet PNG beside it."""
    from selfsup.core import run as rundir
    from selfsup.engine.device import resolve_device
    from selfsup.image import draw
    from selfsup.image.evaluation import extract_features
    from selfsup.image.runs import dataset_for, load

    dataset = dataset_for(run, data, stream=True)  # one pass: never all in memory
    features = extract_features(load(run), dataset, device=resolve_device(device))
    picks = choose(features, budget, strategy, seed)
    out = Path(out) if out else rundir.inside_run(run, "select", f"{strategy}-{budget}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = getattr(dataset, "paths", None)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", "index", "path"])
    for rank, index in enumerate(picks, 1):
        writer.writerow([rank, int(index), paths[index] if paths else ""])
    from selfsup.core.run import atomic_write_text

    atomic_write_text(out, text.getvalue())
    images = dataset.images(torch.as_tensor(picks[:64])).float() / 255
    sheet = draw.image_sheet(
        images, out.with_suffix(".png"), [f"#{i + 1}" for i in range(len(images))]
    )
    return {"indices": picks.tolist(), "csv": str(out), "sheet": str(sheet), "strategy": strategy}
