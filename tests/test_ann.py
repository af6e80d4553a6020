"""Approximate search (FAISS): recall against a brute-force numpy search on clustered data, exact
scores, the index written and read back, and one line when faiss is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.image.use import ann

faiss = pytest.importorskip("faiss")


def clustered(n: int, d: int = 32, clusters: int = 100, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (noise as large as the centre: cosine ~0.7 to it)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)[:, :k]


def test_recall_against_brute_force_on_clustered_data() -> None:
    data = clustered(20_200)
    x, q = data[:20_000], data[20_000:]  # the queries are not in the index
    index, info = ann.build(x, recall=0.95)
    assert info["nprobe"] < info["lists"]  # it does search only part of the index
    ids, scores = ann.search(index, q, 10)
    truth = brute_force(x, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= 0.9, (recall, info)
    # the similarities it returns are the exact cosines of the rows it found
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-5)


def test_without_cluster_structure_a_note_and_batches_searched_exactly() -> None:
    x = np.random.default_rng(0).standard_normal((4100, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x, q = x[:4000], x[4000:]
    index, info = ann.build(x)
    assert 2 * info["nprobe"] > info["lists"] and "little cluster structure" in ann.structure_note(
        info
    )
    for queries in (q, q[:1]):  # a batch: the float vectors; one query: the 8-bit scan
        ids, scores = ann.search(index, queries, 10)
        np.testing.assert_array_equal(ids, brute_force(x, queries, 10))
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, x[ids]), atol=1e-5)
    # an IVF-Flat index, as selfsup wrote before the 8-bit codes, still searches
    flat = faiss.IndexIVFFlat(faiss.IndexFlatIP(64), 64, 4, faiss.METRIC_INNER_PRODUCT)
    flat.train(x)
    flat.add(x)
    flat.nprobe = 4
    np.testing.assert_array_equal(ann.search(flat, q, 10)[0], brute_force(x, q, 10))
    _, info = ann.build(clustered(4000))
    assert ann.structure_note(info) is None, info


def test_the_index_file_round_trip(tmp_path: Path) -> None:
    x = clustered(3000, seed=1)
    index, info = ann.build(x)
    ann.save(index, tmp_path / "a.faiss")
    again = ann.load(tmp_path / "a.faiss", len(x))
    assert ann.nprobe(again) == info["nprobe"] and again.ntotal == len(x)
    q = clustered(50, seed=2)
    for before, after in zip(ann.search(index, q, 10), ann.search(again, q, 10), strict=True):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(SelfsupError, match="holds 3000 vectors"):
        ann.load(tmp_path / "a.faiss", 2999)
    (tmp_path / "b.faiss").write_bytes(b"not an index")
    with pytest.raises(SelfsupError, match="not a FAISS index"):
        ann.load(tmp_path / "b.faiss", 3000)


def test_without_faiss_one_line_and_exact_search_still_works(
    digits_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from PIL import Image

    from selfsup.image.use.search import similar

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    index = tmp_path / "x.index"
    argv = ["index", str(digits_run), f"folder:{folder}", "-o", str(index), "--approximate"]
    assert main(argv) == 0 and ann.faiss_path(index).is_file()
    fast = similar(index, folder / "3.png", k=4)
    assert fast["search"] == "approximate" and fast["hits"][0]["path"] == str(folder / "3.png")

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    exact = similar(index, folder / "3.png", k=4)  # falls back to exact search: same answer
    assert exact["search"] == "exact"
    assert [h["path"] for h in exact["hits"]] == [h["path"] for h in fast["hits"]]
    np.testing.assert_allclose(
        [h["similarity"] for h in exact["hits"]], [h["similarity"] for h in fast["hits"]], atol=1e-5
    )
    capsys.readouterr()
    other = tmp_path / "y.index"
    assert main([*argv[:4], str(other), "--approximate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'selfsup[search]'" in err and len(err.splitlines()) == 1, err
    assert not other.exists()
    assert main(argv[:-1]) == 0  # an exact index in its place removes the stale FAISS file
    assert not ann.faiss_path(index).exists()
