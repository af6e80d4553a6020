"""Similar images: exact search against a brute-force numpy reference, the query finds itself,
and a trained encoder's neighbours share the query's class."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from selfsup.cli.main import main
from selfsup.image.data import load_splits
from selfsup.image.use.exact import nearest
from selfsup.image.use.search import load_index


def test_chunked_exact_search_equals_brute_force(monkeypatch) -> None:
    import selfsup.image.use.exact as exact

    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    query = features[17] + 0.1 * rng.normal(size=16).astype(np.float32)
    query /= np.linalg.norm(query)
    monkeypatch.setattr(exact, "CHUNK", 97)  # many chunks, one partial
    ids, scores = nearest(features, query, 10)
    expected = np.argsort(-(features @ query), kind="stable")[:10]
    assert ids.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, (features @ query)[expected], rtol=1e-5)


def test_index_and_similar_from_the_command_line(digits_run: Path, tmp_path: Path, capsys) -> None:
    _, test = load_splits("digits")
    folder, labels = tmp_path / "digits", {}
    for i in range(200):
        path = folder / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.x[i][0].numpy()).save(path)
        labels[str(path)] = int(test.y[i])
    index = tmp_path / "digits.index"
    argv = ["index", str(digits_run), f"folder:{folder}", "-o", str(index), "--batch-size", "64"]
    assert main(argv) == 0
    features, paths, _ = load_index(index)
    assert features.shape[0] == 200 and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    same_class = []
    for i in range(0, 200, 20):
        query = folder / f"{i:03d}.png"
        out = tmp_path / f"n{i}.png"
        assert main(["similar", str(index), str(query), "-k", "8", "-o", str(out)]) == 0
        hits = list(csv.DictReader(out.with_suffix(".csv").open()))
        assert hits[0]["path"] == str(query) and float(hits[0]["similarity"]) > 0.999
        same_class += [labels[h["path"]] == labels[str(query)] for h in hits[1:]]
        assert out.is_file()
    assert np.mean(same_class) > 0.8, np.mean(same_class)  # chance would be about 0.1
    capsys.readouterr()
    assert main(["similar", str(index), str(tmp_path / "none.png")]) == 2
    assert main(["similar", str(tmp_path / "n0.png"), str(folder / "000.png")]) == 2
