"""`selfsup report`: the page of a trained digits run, of folders missing pieces, of language
runs, the map's subsample, and the page rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfsup.cli import main
from selfsup.reporting import report
from selfsup.reporting.images import map_indices

pytestmark = pytest.mark.usefixtures("one_thread")


class Page(HTMLParser):
    """The parts of a page the tests look at: tags, their attributes, section ids, legend."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.legend: list[str] = []
        self._in_legend = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "ul" and dict(attrs).get("class") == "legend":
            self._in_legend = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "ul":
            self._in_legend = False

    def handle_data(self, data: str) -> None:
        if self._in_legend and data.strip():
            self.legend.append(data.strip())

    def all(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag]


def decoded_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


@pytest.fixture(scope="module")
def evaluated(digits_run: Path, tmp_path_factory, monkeypatch_module) -> tuple[Path, str]:
    """digits_run evaluated from the command line with the automatic report on (a quick
    evaluation: two fractions, one seed, a fixed probe C, label noise)."""
    monkeypatch_module.setenv("SELFSUP_REPORT", "1")
    argv = ["evaluate", str(digits_run), "--fractions", "1", "--seeds", "1", "--baselines"]
    argv += ["raw", "--no-kmeans", "--probe-c", "1", "--label-noise", "0.3"]
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return digits_run, out.getvalue()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_evaluate_writes_a_self_contained_report_with_every_section(evaluated) -> None:
    run, printed = evaluated
    page_path = run / "report.html"
    assert f"report: {page_path}" in printed
    text = page_path.read_text()
    page = Page(text)
    ids = {a.get("id") for a in page.all("section")}
    assert {"curves", "few_label", "map", "neighbours", "augment", "samples", "about"} <= ids
    # one file: no script, no stylesheet link, nothing fetched from the network
    assert not page.all("script") and not page.all("link")
    for _, attrs in page.tags:
        for name in ("src", "href"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(name, "")), attrs
    images = page.all("img")
    # loss, lr and probe-accuracy curves; few-label plot; map; neighbours; augmentations;
    # first and last sample grids
    assert len(images) >= 9
    for a in images:
        png = decoded_png(a["src"])
        assert png.width > 0 and png.height > 0 and a.get("alt")
    assert page.legend == [str(d) for d in range(10)]  # the map's legend: digits' classes

    results = json.loads((run / "eval" / "digits" / "results.json").read_text())
    rows = [r for r in results["few_label"] if r["method"] == "selfsup" and r["fraction"] == 1.0]
    clean = [r["accuracy"] for r in rows if not r.get("label_noise")]
    assert f"{100 * clean[0]:.1f} ± 0.0" in text  # one seed: the table shows the row itself
    assert "30% of the labels flipped" in text

    # a trained encoder's neighbours mostly share the query's class (chance: about 1 in 10)
    same, total = map(int, re.search(r"(\d+) of (\d+) neighbours share", text).groups())
    assert total == 64 and same / total > 0.6

    # pretrain's throughput: 25 epochs of 1437 // 256 = 5 steps of 256 images
    session = json.loads((run / "run_info.json").read_text())["sessions"][-1]
    assert session["images"] == 25 * 5 * 256 and session["images_per_second"] > 0
    assert torch.__version__.startswith(session["versions"]["torch"])


def test_report_of_several_runs_and_of_folders_missing_pieces(evaluated, tmp_path, capsys):
    run, _ = evaluated
    bare = tmp_path / "unfinished"  # config and a few metrics rows: killed before an epoch
    bare.mkdir()
    (bare / "config.yaml").write_text((run / "config.yaml").read_text())
    (bare / "metrics.csv").write_text("epoch,step,train/loss\n0,4,5.1\n0,9,4.7\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "page.html"
    argv = ["report", str(run), str(bare), str(empty), "-o", str(out), "--no-embeddings"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert "Not in the run folder" in text
    assert "encoder.safetensors (no epoch finished)" in text
    assert "not evaluated yet" in text and "samples/epochNNN.png" in text
    assert "config.yaml (unreadable or absent" in text
    alts = [a["alt"] for a in Page(text).all("img")]
    assert alts.count("loss curve (metrics.csv)") == 2  # the trained run's and the bare one's
    assert "t-SNE map of the embeddings" not in alts  # --no-embeddings

    assert main(["report", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(run), str(bare)]) == 2  # two runs need -o
    assert "-o" in capsys.readouterr().err


def test_language_run_shows_its_curves_results_and_word_neighbours(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    run = tmp_path / "lm"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "word2vec", "data": "x.txt"}))
    rows = ["step,train/loss,train/lr,val/loss"]
    rows += [f"{s},{4 - s / 50},{1e-3},{'' if s % 20 else 4.1 - s / 60}" for s in range(0, 100, 5)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run / "results.json").write_text(json.dumps({"val_loss": 2.5, "final": {"loss": 2.5}}))
    # vectors built so that queen is king's nearest word (cosine 0.99), apple far from both
    words = ["king", "queen", "man", "woman", "apple"]
    vectors = np.array(
        [[1, 0, 0.1], [1, 0, 0.25], [0, 1, 0], [0.1, 1, 0.1], [-1, -1, 0]], dtype=np.float32
    )
    (run / "vocab.tsv").write_text("".join(f"{w}\t{10 - i}\n" for i, w in enumerate(words)))
    save_file({"input": vectors, "output": vectors}, str(run / "vectors.safetensors"))
    (run / "best_of_n.json").write_text(json.dumps([{"n": n, "gold": n / 10} for n in (1, 2, 4)]))

    text = report(run).read_text()
    page = Page(text)
    alts = [a["alt"] for a in page.all("img")]
    assert "loss curve (metrics.csv)" in alts and "learning rate curve (metrics.csv)" in alts
    assert "best-of-n curve" in alts
    assert "metrics.csv: train/loss, val/loss" in text  # train and validation on one plot
    assert "<td>final.loss</td><td>2.5</td>" in text
    row = re.search(r"<td>king</td><td>([^<]*)</td>", text).group(1)
    assert row.split(",")[0].split()[0] == "queen" and "apple" not in row.split(",")[0]


def test_map_subsample_is_stratified_seeded_and_at_most_5000() -> None:
    y = np.repeat(np.arange(4), [10_000, 6_000, 3_000, 1_000])
    idx = map_indices(y, len(y))
    assert len(idx) == 5000 and len(set(idx.tolist())) == 5000
    counts = Counter(y[idx].tolist())
    for c, n in zip(range(4), (10_000, 6_000, 3_000, 1_000), strict=True):
        assert abs(counts[c] - 5000 * n / 20_000) <= 1  # each class its share (2500, 1500, ...)
    assert np.array_equal(idx, map_indices(y, len(y)))
    assert not np.array_equal(idx, map_indices(y, len(y), seed=1))
    assert np.array_equal(map_indices(y[:300], 300), np.arange(300))
    assert len(map_indices(None, 9000)) == 5000


def test_the_report_renders_in_headless_chromium(evaluated, tmp_path: Path) -> None:
    from _chromium import find_chromium, render

    if find_chromium() is None:
        pytest.skip("Chromium not found on PATH (apt-get install chromium)")
    run, _ = evaluated
    for width in (1280, 390):
        state = render(run / "report.html", width=width)
        assert state["console_errors"] == []
        assert state["images"] and all(i["complete"] and i["width"] > 0 for i in state["images"])
        assert state["pageWidth"] <= state["viewport"] == width  # no sideways scrolling
        assert state["wideText"] == []
        shot = np.asarray(Image.open(io.BytesIO(state["screenshot"])).convert("L"), dtype=float)
        assert shot.shape[1] == width
        assert shot.std() > 10 and len(np.unique(shot)) > 20  # text and plots, not a blank page


def test_pretrain_ends_by_writing_the_report_and_printing_its_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFSUP_REPORT", "1")
    run = tmp_path / "run"
    argv = ["pretrain", "simclr", "--data", "digits", "--limit", "256", "--batch-size", "128"]
    argv += ["--epochs", "1", "--out", str(run), "--no-online-probe"]
    assert main(argv) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    page = Page((run / "report.html").read_text())
    assert {"curves", "map", "neighbours", "samples"} <= {a.get("id") for a in page.all("section")}
    session = json.loads((run / "run_info.json").read_text())["sessions"][0]
    assert session["images"] == 2 * 128  # 256 // 128 steps of 128 images
