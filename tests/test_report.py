"""`selfsup report`: the page of a trained digits run, of folders missing pieces, of language
runs, the map's subsample, and the page rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import warnings
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfsup.cli.main import main
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


def test_constant_or_non_finite_embeddings_give_no_map_and_say_why(tmp_path: Path) -> None:
    """All-black images give every image the same features: scikit-learn's t-SNE crashed the
    process on them (segfault). One guard serves the map, the neighbours, the PCA picture of
    `selfsup evaluate` and its k-means."""
    from selfsup.api import _plot_embeddings
    from selfsup.core.errors import SelfsupError
    from selfsup.image.evaluation import kmeans_scores
    from selfsup.image.evaluation.features import embedding_problem
    from selfsup.reporting.images import _map_section, _neighbour_section, tsne

    same = np.zeros((40, 8), dtype=np.float32)
    y = np.arange(40) % 4
    assert "all 40 embeddings are the same point" in embedding_problem(same)
    assert "the same point" in embedding_problem(np.full((40, 8), 3.0))  # not only zeros
    nan = np.random.default_rng(0).normal(size=(40, 8))
    nan[[3, 7]] = np.nan
    assert "2 of 40 embeddings hold NaN or infinite values" in embedding_problem(nan)
    assert embedding_problem(np.random.default_rng(0).normal(size=(40, 8))) is None
    with pytest.raises(ValueError, match="same point"):
        tsne(same)
    s = _map_section(same, y, None, "held-out test", 40)
    assert s.body == "" and s.notes[0].startswith("no map: all 40 embeddings are the same point")
    s = _neighbour_section(None, same, y, None, same, None)
    assert s.notes[0].startswith("no neighbours: all 40 embeddings")
    # k-means of one point is one cluster: NMI 0, accuracy the largest class's share (10/40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and without ConvergenceWarning noise
        assert kmeans_scores(same, y, 4) == {"nmi": 0.0, "acc": 0.25}
    with pytest.raises(SelfsupError, match="k-means: 2 of 40 embeddings hold NaN"):
        kmeans_scores(nan, y, 4)
    _plot_embeddings(same, y, tmp_path / "embeddings.png", None)  # the picture says why
    assert Image.open(tmp_path / "embeddings.png").size[0] > 0


def test_unlabelled_training_queries_are_not_their_own_neighbours_and_captions_say_so() -> None:
    from selfsup.image.data import ImageData
    from selfsup.reporting.images import _map_section, _neighbour_section, nearest_images

    g = np.random.default_rng(0).normal(size=(30, 6))
    nearest, _ = nearest_images(g[[2, 5]], g, 3, itself=np.array([2, 5]))
    sims = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (
        g[[2, 5]] / np.linalg.norm(g[[2, 5]], axis=1, keepdims=True)
    ).T
    for i, q in enumerate((2, 5)):
        ranked = [j for j in np.argsort(-sims[:, i]) if j != q][:3]  # by hand, itself left out
        assert nearest[i].tolist() == ranked
    data = ImageData(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), None, None, "x")
    s = _neighbour_section(data, g[:6], None, data, g[:6], None, own=np.arange(6))
    assert "each row: a training image (the data has no held-out split)" in s.body
    assert "its 5 nearest among the other 5 training images" in s.body
    assert "held-out test image" not in s.body
    caption = re.search(
        r"<figcaption>(.*?)</figcaption>", _map_section(g, None, None, "training", 9000).body
    ).group(1)
    assert "30 of the 9000 training images (a uniform random sample, seed 0)" in caption
    assert "stratified" not in caption
    assert "all 30 training images" in _map_section(g, None, None, "training", 30).body


def test_neighbour_labels_are_at_least_10_px_on_screen(evaluated) -> None:
    """The labels' digits (green or red) measured in the picture, at the narrowest width the
    page shows it (its min-width): a 10 px font's digits measure 6.6 px so (0.66 em; the old
    8 pt labels, shown at most 580 px wide, measured 4.3 px)."""
    run, _ = evaluated
    tag = next(
        a
        for a in Page((run / "report.html").read_text()).all("img")
        if a["alt"].startswith("query images")
    )
    shown = int(re.search(r"min-width:(\d+)px", tag["style"]).group(1))
    png = np.asarray(decoded_png(tag["src"]).convert("RGB")).astype(int)
    coloured = np.zeros(png.shape[:2], bool)
    for colour in ((0x1A, 0x7F, 0x37), (0xC6, 0x28, 0x28)):
        coloured |= np.abs(png - colour).sum(axis=2) < 60
    rows = np.flatnonzero(coloured.any(axis=1))
    bands = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)  # one per row of labels
    assert len(bands) == 8
    height = max(len(b) for b in bands)  # the digits' height (antialiasing varies by a pixel)
    assert height * shown / png.shape[1] >= 6.5


def test_language_stage_pages_samples_wall_time_and_separate_axes(tmp_path: Path) -> None:
    import os

    from selfsup.reporting.curves import curve_figure

    runs = {}
    for stage in ("reward", "rlhf"):
        run = runs[stage] = tmp_path / stage
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"stage": stage, "data": "x.jsonl"}))
        rows = ["iteration,kl,ppo/approx_kl"]
        rows += [f"{i},{5.7 * i / 9},{1e-4 * (i % 3)}" for i in range(10)]
        (run / "metrics.csv").write_text("\n".join(rows) + "\n")
        os.utime(run / "config.yaml", (1_000_000, 1_000_000))
        os.utime(run / "metrics.csv", (1_000_123, 1_000_123))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.yaml").write_text(yaml.safe_dump({"model": "gpt", "data": "x.txt"}))
    out = tmp_path / "page.html"
    text = report([runs["reward"], runs["rlhf"], gpt], out).read_text()
    assert text.count("the run folder holds no samples.txt") == 1  # the GPT's, not the stages'
    summary = text.split("<h2>Summary</h2>")[1].split("</table>")[0]
    assert summary.count("<td>≈123</td>") == 2 and "≈: wall time from the run folder's" in text
    # kl (0-5.7) and approx_kl (~1e-4): two axes, each with its own line
    rows = [{"iteration": i, "kl": 5.7 * i / 9, "ppo/approx_kl": 1e-4 * (i % 3)} for i in range(10)]
    fig = curve_figure([("r", rows)], ["kl", "ppo/approx_kl"], "KL from the reference")
    labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert labels == [["kl"], ["ppo/approx_kl"]]
    rows = [{"step": i, "train/loss": 4 - i / 5, "val/loss": 4.1 - i / 5} for i in range(10)]
    fig = curve_figure([("r", rows)], ["train/loss", "val/loss"], "loss")
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == 2  # one scale: one plot


def test_map_shows_the_dataset_of_the_latest_evaluation(digits_run: Path, tmp_path: Path) -> None:
    import shutil

    from selfsup.reporting.images import embedding_sections

    run = tmp_path / "run"
    shutil.copytree(digits_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    rng = np.random.default_rng(0)
    other = tmp_path / "other.npz"
    x = rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8)
    np.savez(other, x=x, y=np.arange(60) % 2, classes=np.array(["left", "right"]))
    (run / "eval" / "other").mkdir(parents=True)
    (run / "eval" / "other" / "results.json").write_text(json.dumps({"data": f"npz:{other}"}))
    config = yaml.safe_load((run / "config.yaml").read_text())
    sections = {s.key: s for s in embedding_sections(run, config)}
    for key in ("map", "neighbours"):
        assert f"data: <b>npz:{other}</b> (the dataset of the latest evaluation" in (
            sections[key].body
        )
    assert Page(sections["map"].body).legend == ["left", "right"]  # not digits' 0-9


def test_wide_tables_scroll_with_a_shadow_at_the_hidden_edge() -> None:
    from selfsup.reporting.page import CSS, table

    assert table(["a"], [[1]]).startswith('<div class="scroll"><table>')
    rule = re.search(r"\.scroll\{([^}]*)\}", CSS).group(1)
    assert "overflow-x:auto" in rule
    # covers that scroll with the content (local) over shadows fixed at the edges (scroll)
    assert rule.count("no-repeat local") == 2 and rule.count("no-repeat scroll") == 2
