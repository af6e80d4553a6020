"""Tests for selfsup.image.evaluation on sklearn digits (N×1×8×8 uint8) with the small ConvNet
encoder."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.axes
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits
from torch import nn

from selfsup.core.errors import SelfsupError
from selfsup.image.data.images import ImageData
from selfsup.image.evaluation import (
    classifier_accuracy,
    extract_features,
    few_label_evaluation,
    finetune,
    fit_classifier,
    flip_labels,
    format_table,
    kmeans_scores,
    knn_accuracy,
    labeled_subset,
    linear_probe,
    plot_few_label,
    summarize,
    supervised_reference,
    write_results,
)
from selfsup.image.evaluation import few_label as few_label_module
from selfsup.image.evaluation.few_label import _holdout
from selfsup.image.models import Encoder


def convnet() -> Encoder:
    """The library's small ConvNet (4 blocks, 256 features) for 1-channel digits."""
    return Encoder("convnet", 1, small_images=True, mean=[0.3], std=[0.4])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems run far slower with torch/BLAS threads fighting over a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[ImageData, ImageData]:
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    classes = [str(i) for i in range(10)]
    return ImageData(x[tr], y[tr], classes, "digits"), ImageData(x[te], y[te], classes, "digits")


def _pixels(data: ImageData) -> tuple[np.ndarray, np.ndarray]:
    return data.x.flatten(1).numpy() / 255, data.y.numpy()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_extract_features_matches_forward_lazy_and_restores_mode(digits):
    train, _ = digits
    data = train.subset(torch.arange(100))
    enc = convnet().train()
    f = extract_features(enc, data, batch_size=32, progress=False)
    assert enc.training and f.dtype == np.float32 and f.shape == (100, 256)
    with torch.no_grad():
        ref = enc.eval()(data.x)
    np.testing.assert_allclose(f, ref.numpy(), rtol=1e-5, atol=1e-6)
    lazy = ImageData(
        None, data.y, data.classes, "lazy", lazy=torch.utils.data.TensorDataset(data.x, data.y)
    )
    np.testing.assert_allclose(
        extract_features(enc, lazy, batch_size=32, progress=False), f, atol=1e-6
    )
    assert not enc.training


def test_linear_probe_digits_pixels_and_noise(digits):
    train, test = digits
    (xtr, ytr), (xte, yte) = _pixels(train), _pixels(test)
    assert linear_probe(xtr, ytr, xte, yte) > 0.9
    g = np.random.default_rng(0)
    noise_acc = linear_probe(g.normal(size=(1437, 64)), ytr, g.normal(size=(360, 64)), yte)
    assert noise_acc < 0.2  # chance is 0.1
    assert linear_probe(xtr[:5], np.full(5, 3), xte, yte) == np.mean(yte == 3)


def test_knn_separated_clusters():
    g = np.random.default_rng(0)
    centers = np.eye(3) * 10
    y = np.repeat([0, 1, 2], 30)
    f = centers[y] + g.normal(size=(90, 3))
    assert knn_accuracy(f[::2], y[::2], f[1::2], y[1::2], k=20) == 1.0


def test_knn_hand_computed_weights():
    # train: a=(1,0) label 5; b=(0,1) and c=(1,1)/√2 label 7. Query (2,0): sims 1, 0, 0.707.
    train_f = np.array([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    train_y = np.array([5, 7, 7])
    q, q_y = np.array([[2.0, 0.0]]), np.array([5])
    assert knn_accuracy(train_f, train_y, q, q_y, k=1) == 1.0
    # τ=1: class 5 gets e^1 = 2.72 < class 7's e^0 + e^0.707 = 3.03
    assert knn_accuracy(train_f, train_y, q, q_y, k=3, temperature=1.0) == 0.0
    # τ=0.1: e^10 = 22026 > 1 + e^7.07 = 1177; k=50 is clipped to 3
    assert knn_accuracy(train_f, train_y, q, q_y, k=50, temperature=0.1) == 1.0


def test_knn_matches_naive_reference():
    g = np.random.default_rng(1)
    train_f, train_y = g.normal(size=(60, 5)), g.integers(0, 4, 60)
    test_f, test_y = g.normal(size=(25, 5)), g.integers(0, 4, 25)
    k, tau = 7, 0.5
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(test_f) @ unit(train_f).T
    preds = []
    for s in sims:
        votes = np.zeros(4)
        for j in np.argsort(-s)[:k]:
            votes[train_y[j]] += np.exp(s[j] / tau)
        preds.append(votes.argmax())
    expected = np.mean(np.array(preds) == test_y)
    got = knn_accuracy(train_f, train_y, test_f, test_y, k=k, temperature=tau, chunk_size=4)
    assert got == pytest.approx(expected)


def test_kmeans_scores_separated_and_permutation_invariant():
    g = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    f = np.eye(3)[y] * 5 + 0.05 * g.normal(size=(60, 3))
    s = kmeans_scores(f, y, 3)
    assert s["nmi"] == pytest.approx(1.0) and s["acc"] == 1.0
    assert kmeans_scores(f, np.array([7, 2, 4])[y], 3) == s
    y_noisy = y.copy()
    y_noisy[0] = 1  # one wrong label: best matching still gets 59 of 60
    assert kmeans_scores(f, y_noisy, 3)["acc"] == pytest.approx(59 / 60)


def test_finetune_learns_digits(digits):
    train, test = digits
    torch.manual_seed(0)
    acc = finetune(convnet(), train, test, epochs=2, lr=3e-3, batch_size=64, seed=0)
    assert acc > 0.5


def test_finetune_none_and_last_k_freeze_the_right_parameters(digits):
    train, _ = digits
    torch.manual_seed(0)
    enc = convnet()
    before = _state(enc)
    kw = {"epochs": 1, "lr": 1e-2, "batch_size": 64, "augment": "none"}

    head_only = fit_classifier(enc, train, trainable="none", **kw)
    after = _state(head_only.encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    assert head_only.head.weight.abs().sum() > 0

    last1 = fit_classifier(enc, train, trainable="last-1", **kw).encoder
    for i, (b0, b1) in enumerate(zip(enc.blocks(), last1.blocks(), strict=True)):
        same = {k: torch.equal(before_b, b1.state_dict()[k]) for k, before_b in _state(b0).items()}
        # frozen blocks keep weights and BN statistics; the last block learns (BN stats update)
        assert all(same.values()) if i < 3 else not any(same.values())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # original intact


@pytest.mark.parametrize("bad", ["last-0", "last-5", "first-1", "last-x", "some"])
def test_finetune_rejects_bad_trainable(digits, bad):
    with pytest.raises(SelfsupError, match="--finetune"):
        fit_classifier(convnet(), digits[0], trainable=bad, epochs=1)


def test_finetune_draws_nothing_from_the_global_rng(digits):
    """The supervised references train in parallel threads: a draw from the global generator
    in one (e.g. a head's default initialisation) would shift another's seeded initialisation."""
    train = digits[0].subset(torch.arange(64))
    torch.manual_seed(0)
    enc = convnet()
    before = torch.get_rng_state()
    fit_classifier(enc, train, epochs=1, batch_size=32, seed=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_finetune_is_seeded_and_steps_override_epochs(digits):
    train = digits[0].subset(torch.arange(100))
    kw = {"epochs": 1, "lr": 1e-2, "batch_size": 32}
    torch.manual_seed(0)
    enc = convnet()
    a, b = fit_classifier(enc, train, seed=3, **kw), fit_classifier(enc, train, seed=3, **kw)
    c = fit_classifier(enc, train, seed=4, **kw)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    calls = []
    enc.register_forward_hook(lambda *_: calls.append(1))  # the hook is shared by deep copies
    fit_classifier(enc, train, steps=7, **kw)  # 3 steps per epoch: 2 epochs and 1 step
    assert len(calls) == 7


def test_labeled_subset_is_stratified_seeded_and_nested():
    y = np.repeat(np.arange(4), [50, 30, 11, 3])
    small, big = labeled_subset(y, 0.1, 0), labeled_subset(y, 0.5, 0)
    assert np.bincount(y[small]).tolist() == [5, 3, 1, 1]
    assert np.bincount(y[big]).tolist() == [25, 15, 6, 2]
    assert set(small) <= set(big)
    other = labeled_subset(y, 0.1, 1)
    assert not np.array_equal(small, other)
    assert not np.array_equal(small[:5], np.arange(5))  # random, not the first n
    assert len(labeled_subset(np.append(y, [-1, -1]), 1.0, 0)) == len(y)  # unlabeled skipped


def test_few_label_evaluation_rows(digits):
    train, test = digits
    torch.manual_seed(0)
    rows = few_label_evaluation(
        convnet(),
        train,
        test,
        fractions=(0.1, 1.0),
        seeds=(0, 1),
        random_encoder=convnet,
        supervised_steps=15,
        batch_size=128,
        progress=False,
    )
    methods = {"selfsup", "raw", "pca", "random", "supervised"}
    assert len(rows) == len(methods) * 2 * 2
    assert {r["method"] for r in rows} == methods
    for f in (0.1, 1.0):
        for s in (0, 1):
            group = [r for r in rows if r["fraction"] == f and r["seed"] == s]
            expected = len(labeled_subset(train.y.numpy(), f, s))
            assert len(group) == 5 and {r["n_labels"] for r in group} == {expected}
    assert {r["n_labels"] for r in rows if r["fraction"] == 1.0} == {1437}
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert {r["probe"] for r in rows if r["method"] != "supervised"} == {"linear"}
    supervised = [r for r in rows if r["method"] == "supervised"]
    assert all(r["steps"] <= 15 and r["val_labels"] > 0 for r in supervised)  # capped at 15
    assert {r["C_by"] for r in rows if r["method"] != "supervised"} == {"cv"}
    raw_full = [r["accuracy"] for r in rows if r["method"] == "raw" and r["fraction"] == 1.0]
    assert min(raw_full) > 0.85


def test_few_label_knn_probe_and_bad_options(digits):
    train, test = digits
    rows = few_label_evaluation(
        convnet(),
        train,
        test,
        fractions=(1.0,),
        seeds=(0,),
        baselines=("raw",),
        probe="knn",
        progress=False,
    )
    assert [r["method"] for r in rows] == ["selfsup", "raw"]
    assert rows[1]["probe"] == "knn" and rows[1]["accuracy"] > 0.9
    with pytest.raises(SelfsupError, match="--probe"):
        few_label_evaluation(convnet(), train, test, probe="svm", progress=False)
    with pytest.raises(SelfsupError, match="--baselines"):
        few_label_evaluation(convnet(), train, test, baselines=("pixels",), progress=False)


ROWS = [
    {"method": m, "fraction": f, "seed": s, "n_labels": n, "accuracy": a, "probe": "linear"}
    for m, f, s, n, a in [
        ("supervised", 0.01, 0, 10, 0.30),
        ("supervised", 0.01, 1, 10, 0.40),
        ("selfsup", 0.01, 0, 10, 0.861),
        ("selfsup", 0.01, 1, 10, 0.885),
        ("selfsup", 1.0, 0, 1000, 0.95),
        ("raw", 0.1, 0, 100, 0.5),
    ]
]


def test_summarize_and_format_table():
    s = {(r["method"], r["fraction"]): r for r in summarize(ROWS)}
    assert s["selfsup", 0.01]["mean"] == pytest.approx(0.873)
    assert s["selfsup", 0.01]["std"] == pytest.approx(0.024 / math.sqrt(2))
    assert s["raw", 0.1]["std"] == 0.0 and s["raw", 0.1]["n_seeds"] == 1
    table = format_table(ROWS)
    lines = table.splitlines()
    assert lines[0].split() == ["method", "1%", "10%", "100%"]
    assert [line.split()[0] for line in lines[2:]] == ["selfsup", "raw", "supervised"]
    assert "87.3 ± 1.7" in lines[2] and "95.0 ± 0.0" in lines[2] and "35.0 ± 7.1" in lines[4]


def test_write_results_round_trips(tmp_path):
    json_path, csv_path = write_results(ROWS, tmp_path / "out")
    assert json.loads(json_path.read_text()) == ROWS
    with open(csv_path) as fh:
        back = list(csv.DictReader(fh))
    types = {"fraction": float, "seed": int, "n_labels": int, "accuracy": float}
    assert [{k: types.get(k, str)(v) for k, v in r.items()} for r in back] == ROWS
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "few_label.csv",
        "few_label.json",
    ]


def test_plot_writes_png(tmp_path):
    out = plot_few_label(ROWS, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_supervised_holdout_is_stratified_and_keeps_single_labels():
    y = np.repeat([0, 1, 2, 3], [10, 5, 2, 1])
    held = _holdout(y, seed=0)
    assert np.bincount(y[held], minlength=4).tolist() == [2, 1, 1, 0]
    assert not np.array_equal(held, _holdout(y, seed=1))
    assert len(_holdout(np.arange(5), seed=0)) == 0  # one label per class: nothing held out


def test_supervised_budget_scales_with_the_labeled_set(digits, monkeypatch):
    """Steps requested = max(100, epochs * steps per epoch of the training part), capped."""
    train, test = digits
    asked = []

    def fake_fit(*args, steps, val, info, **kw):
        asked.append((steps, len(val) if val is not None else 0))
        info.update(steps=steps, best_step=steps)
        return convnet()

    monkeypatch.setattr(few_label_module, "fit_classifier", fake_fit)
    monkeypatch.setattr(few_label_module, "accuracy_on", lambda *a, **kw: 0.5)
    one_each = labeled_subset(train.y.numpy(), 0.001, 0)  # 10 labels, one per class
    for idx, kw in [(one_each, {}), (slice(None), {}), (slice(None), {"max_steps": 50})] + [
        (slice(None), {"epochs": 100})
    ]:
        supervised_reference(convnet, train.subset(torch.arange(1437)[idx]), test, seed=0, **kw)
    fit_1437 = 1437 - len(_holdout(train.y[:1437].numpy(), 0))
    assert asked == [
        (100, 0),  # one label per class: the minimum, nothing held out to early-stop on
        (max(100, 30 * (fit_1437 // 256)), 1437 - fit_1437),
        (50, 1437 - fit_1437),
        (100 * (fit_1437 // 256), 1437 - fit_1437),
    ]


def test_early_stopping_returns_the_best_checkpoint(digits):
    train, _ = digits
    fit_part, val = train.subset(torch.arange(300)), train.subset(torch.arange(300, 400))
    torch.manual_seed(0)
    info: dict = {}
    model = fit_classifier(
        convnet(), fit_part, epochs=40, lr=3e-2, batch_size=100, augment="none", val=val,
        patience=2, eval_every=3, info=info,
    )  # fmt: skip
    assert info["steps"] < 120 and info["steps"] % 3 == 0  # stopped early, at a check
    assert info["steps"] - info["best_step"] == 2 * 3  # two checks without improvement
    assert classifier_accuracy(model, val) == info["val_accuracy"]  # the best, not the last


def test_flip_labels_flips_exactly_that_many_to_other_classes():
    y = np.repeat(np.arange(5), 40)
    noisy = flip_labels(y, 0.3, seed=1)
    assert np.sum(noisy != y) == 60  # round(0.3 * 200), each to a different class
    assert set(np.unique(noisy)) <= set(range(5))
    np.testing.assert_array_equal(noisy, flip_labels(y, 0.3, seed=1))
    assert not np.array_equal(noisy, flip_labels(y, 0.3, seed=2))
    assert np.sum(flip_labels(y, 1.0, seed=0) == y) == 0


def test_label_noise_rows_train_on_flipped_labels(digits, monkeypatch):
    train, test = digits
    seen = []
    real = few_label_module.probe_accuracy
    monkeypatch.setattr(
        few_label_module,
        "probe_accuracy",
        lambda x, y, *a, **kw: seen.append(y.copy()) or real(x, y, *a, **kw),
    )
    rows = few_label_evaluation(
        convnet(), train, test, fractions=(1.0,), seeds=(0,), baselines=("raw",),
        label_noise=(0.4,), progress=False,
    )  # fmt: skip
    clean = {r["method"]: r["accuracy"] for r in rows if "label_noise" not in r}
    noisy = {r["method"]: r["accuracy"] for r in rows if r.get("label_noise") == 0.4}
    assert set(clean) == set(noisy) == {"selfsup", "raw"}
    y = train.y.numpy()
    flipped = [np.mean(s != y) for s in seen]
    assert sorted(flipped) == pytest.approx([0, 0, 0.4, 0.4], abs=1e-3)  # per representation
    assert noisy["raw"] < clean["raw"]
    assert "40%" not in format_table(rows) and format_table(rows, 0.4) != format_table(rows)
    with pytest.raises(SelfsupError, match="--label-noise"):
        few_label_evaluation(convnet(), train, test, label_noise=(1.5,), progress=False)


def test_the_supervised_reference_under_label_noise_trains_on_the_flipped_labels(
    digits, monkeypatch
):
    train, test = digits
    seen = []
    real = few_label_module.supervised_reference
    monkeypatch.setattr(
        few_label_module,
        "supervised_reference",
        lambda make, subset, *a, **kw: (
            seen.append(subset.y.numpy().copy()) or real(make, subset, *a, **kw)
        ),
    )
    rows = few_label_evaluation(
        convnet(), train, test, fractions=(0.1,), seeds=(0,), baselines=("supervised",),
        label_noise=(0.4,), supervised_epochs=1, supervised_steps=3, progress=False,
    )  # fmt: skip
    idx = few_label_module.labeled_subset(train.y.numpy(), 0.1, 0)
    truth = train.y.numpy()[idx]
    flipped = sorted(float(np.mean(y != truth)) for y in seen)
    assert flipped == pytest.approx([0.0, 0.4], abs=0.01)
    assert {r["method"] for r in rows if r.get("label_noise") == 0.4} == {"selfsup", "supervised"}


def test_supervised_references_in_threads_give_the_rows_of_one_after_another(digits, monkeypatch):
    """The supervised networks train in worker threads beside the probes: the same rows, in the
    same order, as trained inline one after another (a job's result under another job's key,
    or a seed that depends on the thread, fails this)."""
    from contextlib import nullcontext

    train, test = digits
    kw = dict(
        fractions=(0.1, 1.0), seeds=(0, 1), baselines=("supervised",), label_noise=(0.2,),
        random_encoder=convnet, supervised_steps=4, progress=False,
    )  # fmt: skip
    encoder = convnet()
    threaded = few_label_evaluation(encoder, train, test, **kw)
    monkeypatch.setattr(few_label_module, "_workers", lambda *a: nullcontext(None))
    inline = few_label_evaluation(encoder, train, test, **kw)
    assert threaded == inline
    assert len({r["accuracy"] for r in inline if r["method"] == "supervised"}) > 2


def test_label_noise_figure_draws_the_tables_means(digits, tmp_path):
    """label_noise.png: per label fraction, each method's mean accuracy at 0% and each noise
    rate, the numbers of the printed tables (read back from the drawn lines)."""
    from selfsup.image.evaluation.report import plot_label_noise

    rows = [
        {"method": m, "fraction": f, "seed": s, "n_labels": 10, "accuracy": a + 0.01 * s, **extra}
        for m, a0 in (("selfsup", 0.9), ("raw", 0.7))
        for f in (0.1, 1.0)
        for s in (0, 1)
        for a, extra in ((a0, {}), (a0 - 0.2, {"label_noise": 0.4}))
    ]
    lines = []
    real_errorbar = matplotlib.axes.Axes.errorbar

    def spy(ax, x, y, *a, **kw):
        lines.append((ax, kw["label"], list(x), list(y)))
        return real_errorbar(ax, x, y, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(matplotlib.axes.Axes, "errorbar", spy)
        out = plot_label_noise(rows, tmp_path / "noise.png")
    drawn = {(ax.get_title(), label): (x, y) for ax, label, x, y in lines}
    assert out.is_file() and out.stat().st_size > 0
    assert drawn["100% of the labels", "raw"] == ([0, 40], pytest.approx([70.5, 50.5]))
    assert drawn["10% of the labels", "selfsup"] == ([0, 40], pytest.approx([90.5, 70.5]))
