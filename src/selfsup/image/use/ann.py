"""Approximate nearest neighbours for large indexes (`selfsup index --approximate`), with FAISS.

The index is an inverted file whose lists hold 8-bit codes of the vectors (FAISS
`IndexIVFScalarQuantizer`, inner product), and the best `REFINE`×k candidates of each search are
re-ranked with the float vectors (`IndexRefineFlat`): on the unit-norm embeddings it ranks by
cosine similarity and the scores it returns are exact; only the search is approximate. The lists
come from spherical k-means, 4 sqrt(N) of them (the low end of FAISS's guideline). A query scans
its `nprobe` nearest lists; `build` picks the smallest power-of-two `nprobe` whose recall@k
against exact search, measured on a sample of the index's own rows (each row itself left out of
both answers), reaches `recall`. Embeddings with cluster structure (an encoder's) need a few
lists; embeddings without it (i.i.d. random directions) need all of them, and then the 8-bit
codes still make the scan faster than exact search: a quarter of the memory to read
(benchmarks/search_scale.py). FAISS writes the index in its own format (no pickle).

faiss-cpu is optional (`pip install 'selfsup[search]'`): exact search needs none of this.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.core.errors import SelfsupError
from selfsup.image.use.exact import exact_search

SAMPLE = 256  # rows used as queries to choose nprobe
TRAIN_PER_LIST = 64  # k-means training rows per list
REFINE = 4  # candidates per wanted answer that the 8-bit scan passes to the exact re-ranking
EXACT_BATCH = 20  # queries at once from which FAISS's flat search uses a BLAS matrix product


def require_faiss() -> Any:
    """The faiss module, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise SelfsupError(
            "approximate search needs faiss: pip install 'selfsup[search]' (or faiss-cpu)"
        ) from None
    return faiss


def faiss_path(index: str | Path) -> Path:
    """The FAISS file kept beside an index file: INDEX.faiss."""
    index = Path(index)
    return index.with_name(index.name + ".faiss")


def build(
    features: np.ndarray, *, recall: float = 0.97, k: int = 10, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """An inverted-file index (8-bit codes, exact re-ranking) of unit-norm `features` (N×D
    float32), and how it was tuned. The default aims above 0.95: the sample's estimate is noisy,
    and new queries (not rows of the index, which also trained the lists) fare a little worse
    (benchmarks/search_scale.py)."""
    faiss = require_faiss()
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, d = features.shape
    nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))  # >= 39 rows a list
    lists = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    lists.cp.spherical = True  # unit-norm centroids: lists by cosine, like the queries
    lists.cp.seed = seed
    lists.cp.min_points_per_centroid = 1  # no warning on small collections (nlist is capped)
    index = faiss.IndexRefineFlat(lists)  # re-ranks the candidates with the float vectors
    index.k_factor = REFINE
    rng = np.random.default_rng(seed)
    train = min(n, TRAIN_PER_LIST * nlist)
    index.train(features[np.sort(rng.choice(n, train, replace=False))] if train < n else features)
    index.add(features)
    rows = np.sort(rng.choice(n, min(n, SAMPLE), replace=False))
    queries = features[rows]
    truth = _without_self(exact_search(features, queries, k + 1)[0], rows, k)
    nprobe, measured = 1, 0.0
    while True:
        lists.nprobe = nprobe
        found = _without_self(index.search(queries, k + 1)[1], rows, k)
        measured = _recall(found, truth)
        if measured >= recall or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    return index, {"lists": nlist, "nprobe": nprobe, "sample_recall": measured}


def structure_note(info: dict[str, Any]) -> str | None:
    """A note when the tuned index scans over half of its lists: embeddings without cluster
    structure (i.i.d. random directions are the extreme), where no inverted file is much faster
    than exact search."""
    if info["lists"] == 1 or 2 * info["nprobe"] <= info["lists"]:
        return None
    return (
        f"note: a query scans {info['nprobe'] / info['lists']:.0%} of the lists: these embeddings "
        "have little cluster structure for the index to use, so it gains only what reading "
        "8-bit codes instead of float vectors saves over exact search"
    )


def _recall(found: list[list[int]], truth: list[list[int]]) -> float:
    """Mean share of each true answer list that `found` has (1 where there is none to find)."""
    shares = [
        len(set(a) & set(b)) / len(b) if b else 1.0 for a, b in zip(found, truth, strict=True)
    ]
    return float(np.mean(shares))


def _without_self(ids: np.ndarray, rows: np.ndarray, k: int) -> list[list[int]]:
    """Each row's k answers other than the row itself (the queries are rows of the index)."""
    return [
        [int(i) for i in found if i != row and i >= 0][:k]
        for found, row in zip(ids, rows, strict=True)
    ]


def nprobe(index: Any) -> int:
    """How many lists a query of `index` scans."""
    return int(require_faiss().extract_index_ivf(index).nprobe)


def save(index: Any, path: Path) -> None:
    require_faiss().write_index(index, str(path))


def load(path: Path, rows: int, dim: int | None = None) -> Any:
    """The FAISS index at `path`, checked to hold `rows` vectors of `dim` (those of its .npz)."""
    faiss = require_faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise SelfsupError(f"{path}: not a FAISS index ({str(e).splitlines()[0]})") from None
    if index.ntotal != rows or dim not in (None, index.d):
        ours = f"{rows}" if dim is None else f"{rows} ({dim}-d)"
        raise SelfsupError(
            f"{path}: holds {index.ntotal} vectors ({index.d}-d) but its index has {ours}; "
            "rebuild it with `selfsup index --approximate`"
        )
    return index


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosine similarities) of the k nearest, per query row, best first. When the index
    scans most of its lists anyway (embeddings without cluster structure), a batch of queries
    goes to the float vectors it keeps for re-ranking: an exact search, one matrix product,
    faster than scanning the codes query by query."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    lists = require_faiss().extract_index_ivf(index)
    exact = getattr(index, "refine_index", None)  # none in an index of an earlier selfsup
    if exact is not None and len(queries) >= EXACT_BATCH and 2 * lists.nprobe > lists.nlist:
        scores, ids = exact.search(queries, k)
    else:
        scores, ids = index.search(queries, k)
    return ids, scores
