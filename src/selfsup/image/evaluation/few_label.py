"""Few-label evaluation: the pretrained encoder against raw pixels, PCA, a random encoder and a
supervised network, on the same stratified labeled subsets."""

from __future__ import annotations

import copy
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import nn
from tqdm.auto import tqdm

from selfsup.core.errors import SelfsupError
from selfsup.image.data.images import ImageData
from selfsup.image.data.transforms import unit_float

from .features import extract_features
from .finetune import accuracy_on, fit_classifier, num_classes_of, seeded_init
from .probes import Preconditioner, knn_accuracy, one_thread, probe_accuracy, standardize

BASELINES = ("raw", "pca", "random", "supervised")
PROBES = ("linear", "knn")


class Pixels(nn.Module):
    """Raw pixels as features: flattened, scaled to [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_float(x).flatten(1)


def flip_labels(y: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Symmetric label noise: round(rate · n) positions, drawn with `seed`, get a label drawn
    uniformly from the other classes present in `y`."""
    g = np.random.default_rng([seed, 20])
    classes = np.unique(y)
    out = y.copy()
    for i in g.choice(len(y), round(rate * len(y)), replace=False):
        others = classes[classes != y[i]]
        if len(others):
            out[i] = others[g.integers(len(others))]
    return out


def labeled_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction · n_c) (at least 1) labeled samples of each class c,
    drawn by a seeded permutation within the class; smaller fractions nest in larger ones."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == c)
        n = max(1, round(fraction * len(idx)))
        chosen.append(idx[torch.randperm(len(idx), generator=g).numpy()[:n]])
    return np.sort(np.concatenate(chosen))


def _reinitialised(encoder: nn.Module) -> nn.Module:
    """A copy of `encoder` with every `reset_parameters()` module re-initialised."""
    fresh = copy.deepcopy(encoder)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def _seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """`make()` under a fixed global seed, leaving the caller's RNG state untouched."""
    with seeded_init(seed):
        return make()


SUPERVISED_MIN_STEPS = 100
SUPERVISED_VAL_FRACTION = 0.2
SUPERVISED_PATIENCE = 5


def supervised_rule(epochs: int, max_steps: int | None) -> str:
    """The supervised reference's training budget, in words (printed beside the table)."""
    cap = f", at most {max_steps}" if max_steps else ""
    return (
        f"supervised: the same architecture trained end to end on each labeled subset with the "
        f"pretraining augmentation, {epochs} epochs over its training part (at least "
        f"{SUPERVISED_MIN_STEPS} steps{cap}), early-stopped on a stratified "
        f"{SUPERVISED_VAL_FRACTION:.0%} of the subset held out (classes with one label stay in "
        f"training; no early stopping when none can be held out)"
    )


def _holdout(y: np.ndarray, seed: int) -> np.ndarray:
    """A seeded stratified SUPERVISED_VAL_FRACTION of positions in y (at least 1 of each class
    with 2 or more labels, none of a class with 1)."""
    g = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) >= 2:
            held.append(g.permutation(idx)[: max(1, round(SUPERVISED_VAL_FRACTION * len(idx)))])
    return np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)


def train_supervised(
    make: Callable[[], nn.Module],
    train: ImageData,
    test: ImageData,
    *,
    seed: int,
    epochs: int = 30,
    max_steps: int | None = None,
    batch_size: int = 256,
    augment: str = "light",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """`make()` (seeded) trained end to end on the labeled `train` by the rule of
    `supervised_rule` (classes: those of `train` and `test`), and {steps, best_step,
    val_labels}."""
    y = train.y.numpy()  # type: ignore[union-attr]
    held = _holdout(y, seed)
    fit_part = train.subset(np.setdiff1d(np.arange(len(y)), held))
    bs = min(batch_size, len(fit_part))
    steps = supervised_steps_planned(len(fit_part), epochs, max_steps, batch_size)
    info: dict = {}
    with one_thread(torch.empty(0, device=device)):  # see probes.one_thread
        model = fit_classifier(
            _seeded(make, seed),
            fit_part,
            num_classes=num_classes_of(train, test),
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            augment=augment,
            device=device,
            val=train.subset(held) if len(held) else None,
            patience=SUPERVISED_PATIENCE,
            eval_every=max(len(fit_part) // bs, 10),
            info=info,
        )
    return model, {"steps": info["steps"], "best_step": info["best_step"], "val_labels": len(held)}


def supervised_steps_planned(
    n_fit: int, epochs: int, max_steps: int | None, batch_size: int
) -> int:
    """The most steps `train_supervised` takes on `n_fit` training labels (early stopping may
    end it sooner)."""
    steps = max(SUPERVISED_MIN_STEPS, epochs * (n_fit // max(1, min(batch_size, n_fit))))
    return min(steps, max_steps) if max_steps else steps


def supervised_cost(
    make: Callable[[], nn.Module],
    train: ImageData,
    subsets: Sequence[np.ndarray],
    *,
    epochs: int,
    max_steps: int | None,
    batch_size: int,
    augment: str,
    device: str | torch.device,
) -> str:
    """One line saying what the supervised references will cost: their planned steps, times a
    step measured here (3 steps of the real training, setup included: an upper estimate)."""
    y = train.y.numpy()  # type: ignore[union-attr]
    total = sum(
        supervised_steps_planned(len(idx) - len(_holdout(y[idx], 0)), epochs, max_steps, batch_size)
        for idx in subsets
    )
    sample = train.subset(labeled_subset(y, 1.0, 0)[: min(batch_size, len(y))])
    start = time.perf_counter()
    with one_thread(torch.empty(0, device=device)):
        fit_classifier(
            _seeded(make, 0), sample, num_classes=num_classes_of(train, train), steps=3,
            batch_size=batch_size, augment=augment, device=device,
        )  # fmt: skip
    per_step = (time.perf_counter() - start) / 3
    minutes = total * per_step / 60
    return (
        f"supervised reference: {len(subsets)} networks, up to {total:,} steps in all, about "
        f"{minutes:.0f} min on {torch.device(device).type} ({1000 * per_step:.0f} ms a step; "
        "leave 'supervised' out of --baselines to skip it)"
    )


def supervised_reference(
    make: Callable[[], nn.Module], train: ImageData, test: ImageData, *, seed: int, **options: Any
) -> tuple[float, dict]:
    """Test accuracy of `train_supervised`'s network (`options`: its keywords), and its {steps,
    best_step, val_labels}."""
    model, info = train_supervised(make, train, test, seed=seed, **options)
    return accuracy_on(model, test, options), info


def _probe_fields(details: dict) -> dict:
    """The row fields of a linear probe's fit: its C, how it was chosen, its iterations."""
    if not details:
        return {}
    return {
        "C": details["C"],
        "C_by": "cv" if details["cv"] else "fixed",
        "probe_iterations": details["n_iter"],
        "probe_converged": details["converged"],
    }


def check_options(
    fractions: Sequence[float],
    seeds: Sequence[int],
    baselines: Sequence[str],
    probe: str,
    probe_c: float | None = None,
    cv_folds: int = 5,
    label_noise: Sequence[float] = (),
) -> None:
    """Reject bad options before any features are computed."""
    if probe not in PROBES:
        raise SelfsupError(f"--probe: expected one of {', '.join(PROBES)}, got {probe!r}")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SelfsupError(f"--baselines: unknown {unknown}; expected from {', '.join(BASELINES)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise SelfsupError(f"--fractions: expected label fractions in (0, 1], got {fractions}")
    if any(not 0 < r <= 1 for r in label_noise):
        raise SelfsupError(f"--label-noise: expected flip rates in (0, 1], got {list(label_noise)}")
    if not seeds:
        raise SelfsupError("--seeds: expected at least one label subset")
    if probe_c is not None and not probe_c > 0:
        raise SelfsupError(f"--probe-c: expected a positive C, got {probe_c}")
    if cv_folds < 2:
        raise SelfsupError(f"--cv-folds: expected at least 2 folds, got {cv_folds}")


@contextmanager
def _workers(device: str | torch.device, jobs: int) -> Iterator[ThreadPoolExecutor | None]:
    """Threads for the supervised references on a CPU with 2+ cores (None: run them inline).

    Each training is seeded by its own generators (and `_seeded` under a lock), so the results do
    not depend on the threads. torch runs one thread per fit meanwhile: the workers are the
    parallelism, and nothing spins waiting on a busy core (see probes.one_thread).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.device(device).type != "cpu" or jobs < 2 or (cores or 1) < 2:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = ThreadPoolExecutor(min(2, cores or 1), thread_name_prefix="supervised")
        try:
            yield pool
        except BaseException:  # Ctrl-C or a failed fit: drop the trainings not started
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    finally:
        torch.set_num_threads(threads)


def few_label_evaluation(
    encoder: nn.Module,
    train: ImageData,
    test: ImageData,
    *,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    baselines: Sequence[str] = BASELINES,
    random_encoder: Callable[[], nn.Module] | None = None,
    probe: str = "linear",
    pca_dim: int = 64,
    supervised_steps: int | None = None,
    supervised_epochs: int = 30,
    batch_size: int = 256,
    augment: str = "light",
    device: str | torch.device = "cpu",
    progress: bool = True,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    probe_c: float | None = None,
    cv_folds: int = 5,
    cv_max_samples: int | None = 10_000,
    label_noise: Sequence[float] = (),
) -> list[dict]:
    """Accuracy of "selfsup" (the encoder's features) and each baseline for every label fraction
    and seed, all on the same stratified labeled subset of `train`:

    raw pixels, PCA(pca_dim) fitted on all train images (unlabeled use), a random encoder's
    features (all with `probe`: "linear" or "knn"; the linear probe's C by stratified
    `cv_folds`-fold cross-validation inside each labeled subset, on at most `cv_max_samples` of
    its labels, or `probe_c`), and
    "supervised": `random_encoder()` trained end to end on the subset with `augment` for
    `supervised_epochs` epochs, early-stopped, at most `supervised_steps` steps (`supervised_rule`).
    `random_encoder` defaults to a re-initialised copy of `encoder`. Features are computed once;
    `features` passes the encoder's (train, test) features when they are already at hand.
    Rows: {method, fraction, seed, n_labels, accuracy, probe} (probe "finetune" for supervised),
    linear-probe rows also {C, C_by ("cv" or "fixed"), probe_iterations, probe_converged},
    supervised rows {steps, best_step, val_labels}. For each rate in `label_noise` the probes are
    also trained on the subset's labels with that fraction flipped (`flip_labels`; rows with
    `label_noise`; the supervised reference is trained on the flipped labels too).
    """
    check_options(fractions, seeds, baselines, probe, probe_c, cv_folds, label_noise)
    for d in (train, test):
        if not d.has_labels:
            raise SelfsupError(f"few-label evaluation: the data {d.name!r} has no labels")
    make_random = random_encoder or (lambda: _reinitialised(encoder))

    def extract(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        kw = {"batch_size": batch_size, "device": device, "progress": progress}
        return extract_features(model, train, **kw), extract_features(model, test, **kw)

    feats = {"selfsup": features if features is not None else extract(encoder)}
    if "raw" in baselines or "pca" in baselines:
        raw = extract(Pixels())
        if "raw" in baselines:
            feats["raw"] = raw
        if "pca" in baselines:
            pca = PCA(min(pca_dim, *raw[0].shape), random_state=0).fit(raw[0])
            feats["pca"] = (pca.transform(raw[0]), pca.transform(raw[1]))
    if "random" in baselines:
        feats["random"] = extract(_seeded(make_random, 0))

    train_y, test_y = train.y.numpy(), test.y.numpy()  # type: ignore[union-attr]
    labeled = test_y >= 0
    test_y = test_y[labeled]
    if probe == "linear":  # standardised once per representation with the statistics of all
        # training features (no labels), moved to the device once, reused by every subset
        feats = {
            name: tuple(standardize(tr, te[labeled], device=device))
            for name, (tr, te) in feats.items()
        }
        precondition = {name: Preconditioner(tr) for name, (tr, _) in feats.items()}
    rows = []
    probed: dict[tuple[str, bytes, float], tuple[float, dict]] = {}  # the probes are
    # deterministic: at 100% every seed draws the same subset, so each is fitted once

    def run_probe(name: str, idx: np.ndarray, labels: np.ndarray, noise: float, seed: int):
        key = (name, idx.tobytes(), noise)
        if key not in probed:
            tr, te = feats[name]
            details: dict = {}
            if probe == "linear":
                acc = probe_accuracy(
                    tr[torch.as_tensor(idx, device=tr.device)],
                    labels,
                    te,
                    test_y,
                    C=probe_c,
                    folds=cv_folds,
                    seed=seed,
                    details=details,
                    precondition=precondition[name],
                    cv_max_samples=cv_max_samples,
                )
            else:
                acc = knn_accuracy(tr[idx], labels, te[labeled], test_y)
            probed[key] = acc, details
        return probed[key]

    subsets = {
        (fraction, seed): labeled_subset(train_y, fraction, seed)
        for fraction, seed in itertools.product(fractions, seeds)
    }
    noisy_labels = {
        (fraction, seed, noise): flip_labels(train_y[idx], noise, seed)
        for (fraction, seed), idx in subsets.items()
        for noise in label_noise
    }
    jobs = [(f, s, 0.0) for f, s in subsets] + list(noisy_labels)
    if "supervised" not in baselines:
        jobs = []
    budget: dict[str, Any] = dict(
        epochs=supervised_epochs, max_steps=supervised_steps, batch_size=batch_size,
        augment=augment, device=device,
    )  # fmt: skip
    if jobs and progress:
        cost = supervised_cost(make_random, train, [subsets[f, s] for f, s, _ in jobs], **budget)
        tqdm.write(cost, file=sys.stderr)
    bar = tqdm(total=len(subsets) + len(jobs), desc="few-label", disable=not progress)

    def supervised(fraction: float, seed: int, noise: float) -> tuple[float, dict]:
        subset = train.subset(subsets[fraction, seed])
        if noise:  # trained, and early-stopped, on the noisy labels
            subset.y = torch.as_tensor(noisy_labels[fraction, seed, noise], dtype=torch.long)
        out = supervised_reference(make_random, subset, test, seed=seed, **budget)
        bar.update()
        return out

    def row(name: str, fraction: float, seed: int, noise: float, acc: float, info: dict) -> dict:
        return {
            "method": name,
            "fraction": float(fraction),
            "seed": int(seed),
            "n_labels": len(subsets[fraction, seed]),
            "accuracy": float(acc),
            "probe": "finetune" if name == "supervised" else probe,
            **({"label_noise": float(noise)} if noise else {}),
            **(info if name == "supervised" else _probe_fields(info)),
        }

    # the supervised networks train in worker threads while this one fits the probes
    with _workers(device, len(jobs)) as pool:
        futures = {job: pool.submit(supervised, *job) for job in jobs} if pool else {}
        probe_rows: dict[tuple, list[dict]] = {}
        for (fraction, seed), idx in subsets.items():
            for noise in (0.0, *label_noise):
                labels = noisy_labels[fraction, seed, noise] if noise else train_y[idx]
                probe_rows[fraction, seed, noise] = [
                    row(name, fraction, seed, noise, *run_probe(name, idx, labels, noise, seed))
                    for name in feats
                ]
            bar.update()
        trained = {
            job: futures[job].result() if job in futures else supervised(*job) for job in jobs
        }
    bar.close()
    rows = []
    for fraction, seed in subsets:  # the clean rows of a subset, then its noisy ones
        for noise in (0.0, *label_noise):
            rows += probe_rows[fraction, seed, noise]
            if (fraction, seed, noise) in trained:
                rows.append(
                    row("supervised", fraction, seed, noise, *trained[fraction, seed, noise])
                )
    return rows
