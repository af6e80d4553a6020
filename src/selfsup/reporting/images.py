"""The sections of an image run that need its encoder and data: the embedding map (t-SNE of at
most MAP_POINTS held-out images, coloured by class), the nearest-neighbour grid and the
augmentation preview of the run's recipe. torch is imported here only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from selfsup.data.sources import stratified_indices
from selfsup.reporting.page import Section, fig_img, legend

MAP_POINTS = 5000  # t-SNE points at most (a stratified, seeded subsample of the test split)
GALLERY = 10_000  # training images the neighbours are searched among (stratified first N)
QUERIES = 8
NEIGHBOURS = 8


def map_indices(y: np.ndarray | None, n: int, max_points: int = MAP_POINTS, seed: int = 0):
    """The points of the embedding map: all `n` when few, else `max_points` of them, each class
    keeping its share (largest remainder), drawn with `seed` (sorted indices)."""
    if n <= max_points:
        return np.arange(n)
    if y is None:
        return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    return stratified_indices(y, max_points, seed=seed)


def class_colours(k: int) -> list[str]:
    """k distinguishable colours (tab10, tab20, then evenly around the hue circle)."""
    if k <= 10:
        return [to_hex(colormaps["tab10"](i)) for i in range(k)]
    if k <= 20:
        return [to_hex(colormaps["tab20"](i)) for i in range(k)]
    return [to_hex(colormaps["hsv"](i / k)) for i in range(k)]


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn) of L2-normalised features, through PCA to 50-D when wider."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if f.shape[1] > 50 and len(f) > 50:
        f = PCA(50, random_state=seed).fit_transform(f)
    perplexity = float(min(30.0, max(2.0, (len(f) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(f)


def image_grid(rows: int, columns: int, cell: float = 1.1) -> tuple[Figure, np.ndarray]:
    """A figure of rows × columns image axes with room for a short title over each; laid out
    by hand (a constrained layout of ~70 axes costs seconds)."""
    fig = Figure(figsize=(cell * columns, (cell + 0.2) * rows))
    fig.grid = True  # type: ignore[attr-defined]  # figure_png: no tight box either
    axes = fig.subplots(rows, columns, squeeze=False)
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - 0.2 / (cell + 0.2) / rows * 1.2,
        wspace=0.08,
        hspace=0.25,
    )
    return fig, np.asarray(axes)


def _show(ax: Any, image: Any, title: str | None = None, colour: str = "black") -> None:
    from selfsup import draw

    draw.show(ax, image)
    if title:
        ax.set_title(title, fontsize=8, color=colour)


def _name(classes: list[str] | None, label: int) -> str:
    if label < 0:
        return "?"
    return classes[label] if classes and label < len(classes) else str(label)


def embedding_sections(run: Path, config: dict[str, Any]) -> list[Section]:
    """Embedding map, neighbour grid and augmentation preview (each with a note if it failed)."""
    import torch

    from selfsup.api import dataset_for, load
    from selfsup.device import resolve_device
    from selfsup.evaluation import extract_features

    encoder = load(run)
    device = resolve_device("auto")
    small = config.get("limit")  # a small try stays small
    train = dataset_for(run, split="train", limit=min(GALLERY, small or GALLERY))
    try:
        test, split = dataset_for(run, split="test", limit=small), "held-out test"
    except Exception:  # a source without a test split: the map shows training images
        test, split = train, "training"
    y_all = test.y.numpy() if test.y is not None else None
    keep = map_indices(y_all, len(test))
    shown = test.subset(keep)
    f = extract_features(encoder, shown, batch_size=256, device=device, progress=False)
    g = extract_features(encoder, train, batch_size=256, device=device, progress=False)
    y = shown.y.numpy() if shown.y is not None else None
    classes = config.get("dataset", {}).get("classes") or test.classes
    sections = [_map_section(f, y, classes, split, len(test))]
    sections.append(_neighbour_section(shown, f, y, train, g, classes))
    sections.append(_augment_section(train, config, torch))
    return sections


def _map_section(f: np.ndarray, y: np.ndarray | None, classes: Any, split: str, n: int) -> Section:
    s = Section("map", "Embedding map (t-SNE)")
    if len(f) < 5:
        s.notes.append(f"only {len(f)} images: too few for a map")
        return s
    xy = tsne(f)
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.add_subplot()
    labelled = y is not None and (y >= 0).any()
    items = []
    size = 7 if len(f) > 2000 else 16
    if labelled:
        present = sorted(int(c) for c in np.unique(y) if c >= 0)
        colours = class_colours(max(present) + 1)
        for c in present:
            m = y == c
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colours[c], alpha=0.8, linewidths=0)
            items.append((_name(classes, c), colours[c]))
        if (y < 0).any():
            m = y < 0
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color="#bbbbbb", linewidths=0)
            items.append(("unlabeled", "#bbbbbb"))
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="#1f77b4", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    caption = (
        f"{len(f)} of the {n} {split} images (stratified by class, seed 0), their features "
        "L2-normalised, t-SNE (scikit-learn); nearby points are images the encoder finds similar"
    )
    s.body = fig_img(fig, "t-SNE map of the embeddings", caption) + (legend(items) if items else "")
    if not labelled:
        s.notes.append("the images have no labels: the map is not coloured by class")
    return s


def _neighbour_section(shown: Any, f: np.ndarray, y: Any, train: Any, g: np.ndarray, classes: Any):
    s = Section("neighbours", "Nearest training images")
    k = min(NEIGHBOURS, len(train))
    q = np.sort(map_indices(y, len(f), QUERIES, seed=1)) if len(f) > QUERIES else np.arange(len(f))
    fn = f[q] / np.maximum(np.linalg.norm(f[q], axis=1, keepdims=True), 1e-12)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    nearest = np.argsort(-(fn @ gn.T), axis=1, kind="stable")[:, :k]
    gy = train.y.numpy() if train.y is not None else None
    fig, axes = image_grid(len(q), k + 1)
    same = total = 0
    queries = shown.images(q)
    for r, (qi, row) in enumerate(zip(q, nearest, strict=True)):
        ql = int(y[qi]) if y is not None else -1
        _show(axes[r, 0], queries[r].float() / 255, f"query {_name(classes, ql)}")
        pics = train.images(row)
        for j, gi in enumerate(row):
            gl = int(gy[gi]) if gy is not None else -1
            ok = ql >= 0 and gl == ql
            same, total = same + ok, total + (ql >= 0 and gl >= 0)
            colour = "#1a7f37" if ok else "#c62828" if ql >= 0 and gl >= 0 else "black"
            _show(axes[r, j + 1], pics[j].float() / 255, _name(classes, gl), colour)
    agree = f"; {same} of {total} neighbours share the query's class (green)" if total else ""
    caption = (
        f"each row: a held-out query, then its {k} nearest of {len(train)} training images "
        f"(cosine similarity of the features){agree}"
    )
    s.body = fig_img(fig, "query images and their nearest training images", caption)
    return s


def _augment_section(train: Any, config: dict[str, Any], torch: Any) -> Section:
    from selfsup.augment import RECIPES, build_recipe

    s = Section("augment", "Augmentations of the run's recipe")
    recipe = config.get("recipe")
    if recipe in (None, "none") or recipe not in RECIPES:
        s.notes.append(f"recipe {recipe!r}: the method draws no augmented views")
        return s
    size = tuple(train.image_size)
    augment = build_recipe(recipe, size, train.channels)
    n = min(6, len(train))
    x = train.images(np.arange(n)).float() / 255
    gen = torch.Generator().manual_seed(0)
    views = [augment(x, gen) for _ in range(4)]
    fig, axes = image_grid(n, 5, cell=1.3)
    for i in range(n):
        _show(axes[i, 0], x[i], "image" if i == 0 else None)
        for j, v in enumerate(views, 1):
            _show(axes[i, j], v[i], f"view {j}" if i == 0 else None)
    s.body = fig_img(fig, f"augmented views ({recipe})", f"recipe {recipe!r}: 4 random views")
    return s
