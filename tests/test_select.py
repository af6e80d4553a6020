"""Choosing what to label from embeddings: k-center against a naive loop, TypiClust on clusters
whose answer is known, and the random baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from selfsup.core.errors import SelfsupError
from selfsup.image.use.select import choose, kcenter, typicality


def _unit(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_kcenter_picks_as_the_greedy_rule_by_hand() -> None:
    z = _unit(np.random.default_rng(0).normal(size=(60, 5))).astype(np.float32)
    picks = kcenter(z, 8, seed=3)
    first = int(np.random.default_rng(3).integers(60))
    expected = [first]
    for _ in range(7):
        distance = [min(np.linalg.norm(z[i] - z[j]) for j in expected) for i in range(60)]
        expected.append(int(np.argmax(distance)))
    assert picks.tolist() == expected


def _blobs(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well separated clusters of the given sizes on the unit sphere, and their centres."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(len(sizes), 16)) * 5)
    points = [c + 0.05 * rng.normal(size=(n, 16)) for c, n in zip(centres, sizes, strict=True)]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.concatenate(points).astype(np.float32), labels, centres


def test_typiclust_takes_one_typical_image_per_cluster_largest_first() -> None:
    sizes = [80, 40, 60, 20, 30]
    z, labels, centres = _blobs(sizes)
    picks = choose(z, 5, "typiclust", seed=0)
    assert sorted(labels[picks]) == [0, 1, 2, 3, 4]  # one per cluster: diverse
    assert labels[picks].tolist() == [0, 2, 1, 4, 3]  # largest clusters first
    for pick in picks:  # typical: among the points nearest its cluster's centre
        members = np.flatnonzero(labels == labels[pick])
        unit = _unit(z[members])
        distance = np.linalg.norm(unit - _unit(centres[labels[pick]][None]), axis=1)
        assert distance[members.tolist().index(pick)] <= np.quantile(distance, 0.25)


def test_typicality_is_the_inverse_mean_distance_to_the_nearest_neighbours() -> None:
    z = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], dtype=np.float32)
    got = typicality(z, k=2)
    for i in range(4):
        d = sorted(np.linalg.norm(z[i] - z[j]) for j in range(4) if j != i)[:2]
        assert got[i] == pytest.approx(1 / np.mean(d), rel=1e-5)


def test_random_is_seeded_and_distinct_and_bad_requests_are_one_line() -> None:
    z = np.random.default_rng(0).normal(size=(50, 4))
    a, b = choose(z, 10, "random", seed=1), choose(z, 10, "random", seed=1)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10
    for budget, strategy, message in [
        (0, "random", "--budget"),
        (51, "kcenter", "--budget"),
        (5, "coreset", "--strategy"),
    ]:
        with pytest.raises(SelfsupError, match=message):
            choose(z, budget, strategy)


def test_select_from_the_command_line_writes_the_picks_and_a_contact_sheet(tmp_path) -> None:
    import csv

    from PIL import Image

    from selfsup.cli.main import main

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    argv = ["pretrain", "simclr", "--data", f"folder:{folder}", "--batch-size", "16"]
    assert main([*argv, "--epochs", "1", "--out", str(run)]) == 0
    out = tmp_path / "picks.csv"
    assert main(["select", str(run), "--budget", "6", "--strategy", "kcenter", "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert len({r["index"] for r in rows}) == 6
    assert all(Path(r["path"]).is_file() and Path(r["path"]).parent == folder for r in rows)
    assert Image.open(out.with_suffix(".png")).size[0] > 100
    assert main(["select", str(run), "--budget", "0"]) == 2
