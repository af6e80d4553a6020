"""The torch linear probe against scikit-learn, and its C chosen by cross-validation on the
labeled subset only (never the test set)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from selfsup.core.errors import SelfsupError
from selfsup.image.data.images import ImageData
from selfsup.image.evaluation import few_label_evaluation, labeled_subset, linear_probe, probes
from selfsup.image.evaluation.probes import (
    C_GRID,
    DEFAULT_C,
    Preconditioner,
    choose_c,
    cv_folds,
    fit_logistic,
    standardize,
)

pytestmark = pytest.mark.usefixtures("one_thread")
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _sk_objective(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, C: float) -> float:
    """scikit-learn's multinomial objective C * sum(log-loss) + ||W||² / 2, written out."""
    z = x @ w.T + b
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return C * -logp[np.arange(len(y)), y].sum() + 0.5 * (w**2).sum()


def _sklearn(x: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=C, tol=1e-6, max_iter=20000).fit(x, y)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw MNIST pixels (784 features, some constant): 600 train and 1,000 test images."""
    if not (MNIST / "train.npz").is_file():
        pytest.skip("needs ../shared/data/mnist")
    with np.load(MNIST / "train.npz") as tr, np.load(MNIST / "test.npz") as te:
        return (
            tr["x"][:600].reshape(600, -1) / 255.0,
            tr["y"][:600],
            te["x"][:1000].reshape(1000, -1) / 255.0,
            te["y"][:1000],
        )


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_probe_matches_sklearn_on_raw_mnist_pixels(mnist, fraction):
    x, y, x_test, y_test = mnist
    idx = labeled_subset(y, fraction, 0)
    scaler = StandardScaler().fit(x[idx])
    xs, xs_test = scaler.transform(x[idx]), scaler.transform(x_test)
    for C in (0.01, 1.0):
        sk = _sklearn(xs, y[idx], C)
        fit = fit_logistic(torch.tensor(xs, dtype=torch.float32), y[idx], C)
        assert fit.converged and fit.n_iter < 400, fit.n_iter  # raw pixels converge
        ours = np.mean(fit.predict(torch.tensor(xs_test, dtype=torch.float32)) == y_test)
        assert abs(ours - sk.score(xs_test, y_test)) <= 0.003
        # the same objective, minimised as well as scikit-learn does (to 1e-4 relative)
        f_ours = _sk_objective(
            fit.weight.double().numpy(), fit.bias.double().numpy(), xs, y[idx], C
        )
        f_sk = _sk_objective(sk.coef_, sk.intercept_, xs, y[idx], C)
        assert f_ours <= f_sk * (1 + 1e-4)
        # linear_probe standardises with the training statistics the same way
        assert linear_probe(x[idx], y[idx], x_test, y_test, C=C) == pytest.approx(ours, abs=0.003)


def test_preconditioned_fit_is_the_same_fit_in_fewer_iterations():
    """Pixel-like features (a few strong shared directions): L-BFGS in V = W L reaches
    scikit-learn's minimum (the same problem, reparametrised) in far fewer iterations."""
    g = np.random.default_rng(0)
    y = np.arange(1000) % 4
    x = g.normal(size=(1000, 4)) @ g.normal(size=(4, 100)) * 3 + g.normal(size=(1000, 100))
    x[:, :4] += np.eye(4)[y]
    xs = standardize(x)[0]
    pre = Preconditioner(xs)
    assert pre.worthwhile
    C = 1.0
    plain, fast = fit_logistic(xs, y, C), fit_logistic(xs, y, C, precondition=pre)
    assert fast.converged and fast.n_iter < 0.5 * plain.n_iter, (fast.n_iter, plain.n_iter)
    xd = xs.double().numpy()
    sk = LogisticRegression(C=C, max_iter=5000).fit(xd, y)  # its default tol: slow enough here
    f_fast = _sk_objective(fast.weight.double().numpy(), fast.bias.double().numpy(), xd, y, C)
    assert f_fast <= _sk_objective(sk.coef_, sk.intercept_, xd, y, C) * (1 + 1e-6)


@pytest.mark.parametrize("precondition", [False, True])
def test_problems_fitted_together_each_reach_their_own_minimum(precondition):
    """Folds of different sizes in one L-BFGS (zero-padded): each fit is scikit-learn's on its
    own rows (padding rows that took part, or a shared mean over all rows, would move them)."""
    d = load_digits()
    x = torch.tensor(StandardScaler().fit_transform(d.data[:900]), dtype=torch.float64)
    y = d.target[:900]
    rows = [np.arange(0, 300), np.arange(300, 550), np.arange(550, 900, 2)]  # 300, 250, 175
    pre = Preconditioner(x)
    pre.worthwhile = precondition  # both code paths, whatever the spectrum says
    C = 0.1
    fits = probes.fit_logistic_many(
        [x[r] for r in rows], [y[r] for r in rows], C, tol=1e-8, precondition=pre
    )
    for fit, r in zip(fits, rows, strict=True):
        sk = _sklearn(x[r].numpy(), y[r], C)
        np.testing.assert_allclose(fit.weight.numpy(), sk.coef_, atol=2e-4)
        np.testing.assert_allclose(fit.bias.numpy(), sk.intercept_, atol=2e-4)
    with pytest.raises(SelfsupError, match="same classes"):
        probes.fit_logistic_many([x[:50], x[:60]], [y[:50] % 2, y[:60] % 3], C)


def test_preconditioner_stays_off_where_it_would_not_help(mnist):
    """Raw MNIST pixels: no few dominant directions (top eigenvalue 6% of the trace)."""
    assert not Preconditioner(standardize(mnist[0])[0]).worthwhile


def test_binary_probe_has_sklearns_single_weight_vector():
    """Two classes: one weight vector penalised once (a two-column softmax would halve C)."""
    d = load_digits()
    keep = d.target < 2
    x = StandardScaler().fit_transform(d.data[keep])
    y = np.where(d.target[keep] == 1, 7, 3)  # arbitrary labels, mapped back by predict
    sk = _sklearn(x, y, 0.01)
    fit = fit_logistic(torch.tensor(x, dtype=torch.float64), y, 0.01)
    assert fit.weight.shape == (1, 64)
    np.testing.assert_allclose(fit.weight.numpy(), sk.coef_, atol=1e-5)
    np.testing.assert_allclose(fit.bias.numpy(), sk.intercept_, atol=1e-5)
    assert set(fit.predict(torch.tensor(x))) == {3, 7}


def test_cv_folds_shrink_with_the_rarest_class():
    assert cv_folds(np.repeat([0, 1, 2], [50, 30, 10]), 5) == 5
    assert cv_folds(np.repeat([0, 1, 2], [50, 3, 10]), 5) == 3
    assert cv_folds(np.repeat([0, 1], [50, 1]), 5) == 1
    c, scores = choose_c(torch.randn(51, 3), np.repeat([0, 1], [50, 1]))
    assert (c, scores) == (DEFAULT_C, {})


def _nuisance(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes whose signal (features 0, 1) hides under a large nuisance that features
    2, 3 measure alone: subtracting them needs large weights, which a small C forbids."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 3
    u = 5 * g.normal(size=(n, 2))
    x = np.concatenate([u + 0.3 * g.normal(size=(n, 2)), u], 1)
    x[:, 0] += np.array([0, 1, -1])[y]
    x[:, 1] += np.array([1, -1, 0])[y]
    return x, y


def test_cv_choice_is_near_the_oracle_c():
    x, y = _nuisance(600, seed=0)
    x_test, y_test = _nuisance(20000, seed=1)
    scaler = StandardScaler().fit(x)
    xs, xs_test = scaler.transform(x), scaler.transform(x_test)
    oracle = {c: _sklearn(xs, y, c).score(xs_test, y_test) for c in C_GRID}  # the known answer
    assert oracle[1e-4] < 0.5 < 0.98 < max(oracle.values())  # C matters a lot here
    chosen, scores = choose_c(torch.tensor(xs, dtype=torch.float32), y)
    assert chosen >= 1.0 and scores[chosen] == max(scores.values())
    assert oracle[chosen] >= max(oracle.values()) - 0.005


def test_c_is_chosen_without_the_test_set():
    """Test labels scrambled and test features replaced: the same C and CV scores, so the test
    set cannot have taken part in choosing C (planting `C chosen on test` fails this)."""
    d = load_digits()
    x, y = d.data[:300], d.target[:300]
    x_test, y_test = d.data[1000:1400], d.target[1000:1400]
    a, b = {}, {}
    acc = linear_probe(x, y, x_test, y_test, details=a)
    g = np.random.default_rng(0)
    linear_probe(x, y, g.normal(size=x_test.shape) * 50, g.permutation(y_test), details=b)
    assert a["C"] == b["C"] and a["cv"] == b["cv"] and a["cv"]
    assert acc > 0.85


def test_few_label_fits_see_only_the_labeled_subset(monkeypatch):
    """A spy on every logistic fit: its rows are rows of that labeled subset (CV folds or the
    whole subset), never test rows or unlabeled training rows."""
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target).long()
    classes = [str(i) for i in range(10)]
    train = ImageData(x[:500], y[:500], classes, "digits")
    test = ImageData(x[500:800], y[500:800], classes, "digits")
    seen = []
    real_fit = probes.fit_logistic_many  # every fit goes through it (CV folds together)

    def spy(xs, ys, C, **kw):
        seen.extend(x.clone() for x in xs)
        return real_fit(xs, ys, C, **kw)

    monkeypatch.setattr(probes, "fit_logistic_many", spy)
    rows = few_label_evaluation(
        torch.nn.Flatten(), train, test, fractions=(0.1,), seeds=(3,), baselines=(),
        progress=False,
    )  # fmt: skip
    idx = labeled_subset(train.y.numpy(), 0.1, 3)
    pixels = x[:500].flatten(1).float()
    std = pixels.std(0, unbiased=False)
    z = (pixels - pixels.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    allowed = {tuple(np.round(r, 4)) for r in z[idx].numpy()}
    assert rows[0]["C_by"] == "cv" and rows[0]["n_labels"] == len(idx) == 50
    assert len(seen) > 2 and max(len(s) for s in seen) == len(idx)  # the final fit: the subset
    assert sum(len(s) < len(idx) for s in seen) >= 2  # the CV fits on folds
    for s in seen:
        assert {tuple(np.round(r, 4)) for r in s.numpy()} <= allowed


@pytest.mark.parametrize(("c", "folds", "flag"), [(0.0, 5, "--probe-c"), (1.0, 1, "--cv-folds")])
def test_bad_probe_options(c, folds, flag):
    d = ImageData(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4) % 2, None, "x")
    with pytest.raises(SelfsupError, match=flag):
        few_label_evaluation(torch.nn.Flatten(), d, d, probe_c=c, cv_folds=folds, progress=False)


def test_cv_on_a_stratified_sample_of_a_large_subset(monkeypatch):
    """Above cv_max_samples the CV fits see a stratified sample; the final fit sees everything."""
    g = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [300, 200, 100])
    x = torch.tensor(g.normal(size=(600, 5)) + np.eye(5)[y], dtype=torch.float32)
    sizes, real_fit = [], probes.fit_logistic_many

    def spy(xs, ys, C, **kw):
        sizes.extend(np.bincount(y, minlength=3).tolist() for y in ys)
        return real_fit(xs, ys, C, **kw)

    monkeypatch.setattr(probes, "fit_logistic_many", spy)
    probes.probe_accuracy(x, y, x, y, folds=4, cv_max_samples=120)
    assert sizes[-1] == [300, 200, 100]  # the final fit: all labels
    assert len(sizes) > 4 and all(s == [45, 30, 15] for s in sizes[:-1])  # 3/4 of 60/40/20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_on_cuda_matches_cpu():
    d = load_digits()
    x, y = d.data[:600], d.target[:600]
    a, b = {}, {}
    cpu = linear_probe(x, y, d.data[600:], d.target[600:], details=a)
    gpu = linear_probe(x, y, d.data[600:], d.target[600:], details=b, device="cuda")
    assert a["C"] == b["C"] and abs(cpu - gpu) <= 0.003
