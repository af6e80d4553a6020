"""The sections of an image run that need its encoder and data: the embedding map (t-SNE of at
most MAP_POINTS held-out images, coloured by class), the nearest-neighbour grid and the
augmentation preview of the run's recipe. The map and neighbours show the dataset of the run's
latest evaluation (`selfsup evaluate RUN --data OTHER`), else the run's own. torch is imported
here only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from selfsup.image.data.sources import stratified_indices
from selfsup.image.evaluation.features import embedding_problem
from selfsup.reporting.common import read_json
from selfsup.reporting.page import Section, esc, fig_img, figure_png, img, legend

MAP_POINTS = 5000  # t-SNE points at most (a stratified, seeded subsample of the test split)
GALLERY = 10_000  # training images the neighbours are searched among (stratified first N)
QUERIES = 8
NEIGHBOURS = 8
LABEL_PT = 12  # the neighbour grid's labels, in points of a 100 dpi picture
LABEL_PX = 11  # ... and their smallest size on screen: the picture is never shown narrower


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
    """2-D t-SNE (scikit-learn) of L2-normalised features, through PCA to 50-D when wider.
    Features `embedding_problem` refuses raise ValueError with its reason."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    problem = embedding_problem(features)
    if problem is not None:
        raise ValueError(problem)

    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if f.shape[1] > 50 and len(f) > 50:
        f = PCA(50, random_state=seed).fit_transform(f)
    perplexity = float(min(30.0, max(2.0, (len(f) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(f)


def image_grid(
    rows: int, columns: int, cell: float = 1.1, title_pt: float = 8
) -> tuple[Figure, np.ndarray]:
    """A figure of rows × columns image axes with room for a short `title_pt` title over each;
    laid out by hand (a constrained layout of ~70 axes costs seconds)."""
    band = 0.2 * max(1.0, title_pt / 8)  # inches over each image for its title
    fig = Figure(figsize=(cell * columns, (cell + band) * rows))
    fig.grid = True  # type: ignore[attr-defined]  # figure_png: no tight box either
    axes = fig.subplots(rows, columns, squeeze=False)
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - band / (cell + band) / rows * 1.2,
        wspace=0.08,
        hspace=1.25 * band,  # 0.25 for 8 pt titles
    )
    return fig, np.asarray(axes)


def _show(
    ax: Any, image: Any, title: str | None = None, colour: str = "black", size: float = 8
) -> None:
    from selfsup.image import draw

    draw.show(ax, image)
    if title:
        ax.set_title(title, fontsize=size, color=colour)


def _name(classes: list[str] | None, label: int) -> str:
    if label < 0:
        return "?"
    return classes[label] if classes and label < len(classes) else str(label)


def embedding_sections(run: Path, config: dict[str, Any]) -> list[Section]:
    """Embedding map, neighbour grid and augmentation preview (each with a note if it failed)."""
    import torch

    from selfsup.engine.device import resolve_device
    from selfsup.image.evaluation import extract_features
    from selfsup.image.runs import dataset_for, load

    encoder = load(run)
    device = resolve_device("auto")
    data, about, data_dir = _shown_data(run, config)
    small = config.get("limit")  # a small try stays small
    try:
        train = dataset_for(run, data, "train", data_dir, limit=min(GALLERY, small or GALLERY))
    except Exception as e:  # the evaluated data moved: show the run's own, and say so
        if data is None:
            raise
        about += f"; it could not be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        data, about = None, f"the run's own data {config.get('data')} ({about})"
        train = dataset_for(run, None, "train", limit=min(GALLERY, small or GALLERY))
    try:
        test, split = dataset_for(run, data, "test", data_dir, limit=small), "held-out test"
    except Exception:  # a source without a test split: the map shows training images
        test, split = train, "training"
    y_all = test.y.numpy() if test.y is not None else None
    keep = map_indices(y_all, len(test))
    shown = test.subset(keep)
    g = extract_features(encoder, train, batch_size=256, device=device, progress=False)
    if test is train:
        f = g[keep]
    else:
        f = extract_features(encoder, shown, batch_size=256, device=device, progress=False)
    y = shown.y.numpy() if shown.y is not None else None
    own_classes = config.get("dataset", {}).get("classes") if data is None else None
    classes = own_classes or test.classes
    head = f"<p>data: <b>{esc(data or config.get('data', '?'))}</b> ({esc(about)})</p>"
    sections = [_map_section(f, y, classes, split, len(test))]
    sections.append(
        _neighbour_section(shown, f, y, train, g, classes, keep if test is train else None)
    )
    for s in sections[:2]:
        s.body = head + s.body
    sections.append(_augment_section(train, config, torch))
    return sections


def _shown_data(run: Path, config: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(--data of the run's latest evaluation when it is another dataset, else None; a few words
    saying which data that is; its --data-dir when the evaluation recorded one)."""
    found = sorted((run / "eval").glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    latest = read_json(found[-1]) if found else None
    data = latest.get("data") if isinstance(latest, dict) else None
    if not isinstance(data, str) or data == config.get("data"):
        return None, "the run's own data", None
    return data, "the dataset of the latest evaluation, not the run's own", latest.get("data_dir")


def _map_section(f: np.ndarray, y: np.ndarray | None, classes: Any, split: str, n: int) -> Section:
    s = Section("map", "Embedding map (t-SNE)")
    problem = embedding_problem(f)
    if len(f) < 5 or problem is not None:
        s.notes.append(f"no map: {problem or f'only {len(f)} images: too few for a map'}")
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
    if len(f) == n:
        which = f"all {n} {split} images"
    else:
        how = "stratified by class" if y is not None else "a uniform random sample"
        which = f"{len(f)} of the {n} {split} images ({how}, seed 0)"
    caption = (
        f"{which}, their features L2-normalised, t-SNE (scikit-learn); nearby points are images "
        "the encoder finds similar"
    )
    s.body = fig_img(fig, "t-SNE map of the embeddings", caption) + (legend(items) if items else "")
    if not labelled:
        s.notes.append("the images have no labels: the map is not coloured by class")
    return s


def _neighbour_section(
    shown: Any,
    f: np.ndarray,
    y: Any,
    train: Any,
    g: np.ndarray,
    classes: Any,
    own: np.ndarray | None = None,
) -> Section:
    """Queries from `shown` and their nearest images of `train`. `own`: where each of `shown`'s
    images sits in `train` when the queries are training images (left out of their own
    neighbours), None when they are held out."""
    s = Section("neighbours", "Nearest training images")
    problem = embedding_problem(g) or embedding_problem(f)
    if problem is not None:
        s.notes.append(f"no neighbours: {problem}")
        return s
    k = min(NEIGHBOURS, len(train) - (own is not None))
    q = np.sort(map_indices(y, len(f), QUERIES, seed=1)) if len(f) > QUERIES else np.arange(len(f))
    nearest, sims = nearest_images(f[q], g, k, None if own is None else own[q])
    gy = train.y.numpy() if train.y is not None else None
    fig, axes = image_grid(len(q), k + 1, title_pt=LABEL_PT)
    same = total = 0
    queries = shown.images(q)
    for r, (qi, row) in enumerate(zip(q, nearest, strict=True)):
        ql = int(y[qi]) if y is not None else -1
        title = f"query {_name(classes, ql)}" if ql >= 0 else "query"
        _show(axes[r, 0], queries[r].float() / 255, title, size=LABEL_PT)
        pics = train.images(row)
        for j, gi in enumerate(row):
            gl = int(gy[gi]) if gy is not None else -1
            ok = ql >= 0 and gl == ql
            same, total = same + ok, total + (ql >= 0 and gl >= 0)
            colour = "#1a7f37" if ok else "#c62828" if ql >= 0 and gl >= 0 else "black"
            title = _name(classes, gl) if gl >= 0 else f"{sims[r, gi]:.2f}"  # no label: cosine
            _show(axes[r, j + 1], pics[j].float() / 255, title, colour, LABEL_PT)
    agree = f"; {same} of {total} neighbours share the query's class (green)" if total else ""
    if own is not None:
        query = "a training image (the data has no held-out split), then its "
        query += f"{k} nearest among the other {len(train) - 1} training images"
    else:
        query = f"a held-out test image, then its {k} nearest of {len(train)} training images"
    scores = "" if gy is not None else ", written over each neighbour"
    caption = f"each row: {query} (cosine similarity of the features{scores}){agree}"
    png = figure_png(fig)
    s.body = img(
        png,
        "query images and their nearest training images",
        caption=caption,
        min_width=min_width(png, LABEL_PT, LABEL_PX),
    )
    return s


def nearest_images(
    queries: np.ndarray, gallery: np.ndarray, k: int, itself: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(the `k` rows of `gallery` most cosine-similar to each query, best first; all the
    similarities, queries × gallery). `itself[i]`: query i's own row in `gallery`, never its
    neighbour."""
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    gn = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sims = qn @ gn.T
    if itself is not None:
        sims[np.arange(len(queries)), itself] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], sims


def min_width(png: bytes, points: float, pixels: float, dpi: int = 100) -> int:
    """The narrowest the picture `png` (drawn at `dpi`) may be shown for its `points`-sized
    text to be `pixels` high on screen."""
    import struct

    width = struct.unpack(">I", png[16:20])[0]  # the PNG header's width
    return int(np.ceil(width * pixels / (points * dpi / 72)))


def _augment_section(train: Any, config: dict[str, Any], torch: Any) -> Section:
    from selfsup.image.augment import RECIPES, build_recipe

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
