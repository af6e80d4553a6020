"""Few-label evaluation: the pretrained encoder against raw pixels, PCA, a random encoder and a
supervised network, on the same stratified labeled subsets."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import nn
from tqdm.auto import tqdm

from selfsup.data.images import ImageData
from selfsup.errors import SelfsupError

from .features import extract_features
from .finetune import finetune
from .probes import knn_accuracy, probe_accuracy, standardize

BASELINES = ("raw", "pca", "random", "supervised")
PROBES = ("linear", "knn")


class _Pixels(nn.Module):
    """Raw pixels as features: flattened, scaled to [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float() / 255


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


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
) -> None:
    """Reject bad options before any features are computed."""
    if probe not in PROBES:
        raise SelfsupError(f"--probe: expected one of {', '.join(PROBES)}, got {probe!r}")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SelfsupError(f"--baselines: unknown {unknown}; expected from {', '.join(BASELINES)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise SelfsupError(f"--fractions: expected label fractions in (0, 1], got {fractions}")
    if not seeds:
        raise SelfsupError("--seeds: expected at least one label subset")
    if probe_c is not None and not probe_c > 0:
        raise SelfsupError(f"--probe-c: expected a positive C, got {probe_c}")
    if cv_folds < 2:
        raise SelfsupError(f"--cv-folds: expected at least 2 folds, got {cv_folds}")


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
    supervised_steps: int | None = 1000,
    supervised_epochs: int = 30,
    batch_size: int = 256,
    augment: str = "light",
    device: str | torch.device = "cpu",
    progress: bool = True,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    probe_c: float | None = None,
    cv_folds: int = 5,
) -> list[dict]:
    """Accuracy of "selfsup" (the encoder's features) and each baseline for every label fraction
    and seed, all on the same stratified labeled subset of `train`:

    raw pixels, PCA(pca_dim) fitted on all train images (unlabeled use), a random encoder's
    features (all with `probe`: "linear" or "knn"; the linear probe's C by stratified
    `cv_folds`-fold cross-validation inside each labeled subset, or `probe_c`), and
    "supervised": `random_encoder()` fine-tuned end to end on the subset with `augment`
    (supervised_steps, or supervised_epochs when steps is None).
    `random_encoder` defaults to a re-initialised copy of `encoder`. Features are computed once;
    `features` passes the encoder's (train, test) features when they are already at hand.
    Rows: {method, fraction, seed, n_labels, accuracy, probe} (probe "finetune" for supervised),
    linear-probe rows also {C, C_by ("cv" or "fixed"), probe_iterations, probe_converged}.
    """
    check_options(fractions, seeds, baselines, probe, probe_c, cv_folds)
    for d in (train, test):
        if not d.has_labels:
            raise SelfsupError(f"few-label evaluation: the data {d.name!r} has no labels")
    make_random = random_encoder or (lambda: _reinitialised(encoder))

    def extract(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        kw = {"batch_size": batch_size, "device": device, "progress": progress}
        return extract_features(model, train, **kw), extract_features(model, test, **kw)

    feats = {"selfsup": features if features is not None else extract(encoder)}
    if "raw" in baselines or "pca" in baselines:
        raw = extract(_Pixels())
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
    rows = []
    probed: dict[tuple[str, bytes], tuple[float, dict]] = {}  # the probes are deterministic: at
    for fraction, seed in tqdm(  # 100% every seed draws the same subset, so each is fitted once
        list(itertools.product(fractions, seeds)), desc="few-label", disable=not progress
    ):
        idx = labeled_subset(train_y, fraction, seed)
        accuracy, info = {}, {}
        for name, (tr, te) in feats.items():
            key = (name, idx.tobytes())
            if key not in probed:
                details: dict = {}
                if probe == "linear":
                    acc = probe_accuracy(
                        tr[torch.as_tensor(idx, device=tr.device)],
                        train_y[idx],
                        te,
                        test_y,
                        C=probe_c,
                        folds=cv_folds,
                        seed=seed,
                        details=details,
                    )
                else:
                    acc = knn_accuracy(tr[idx], train_y[idx], te[labeled], test_y)
                probed[key] = acc, details
            accuracy[name], info[name] = probed[key]
        if "supervised" in baselines:
            accuracy["supervised"] = finetune(
                _seeded(make_random, seed),
                train.subset(idx),
                test,
                trainable="all",
                epochs=supervised_epochs,
                steps=supervised_steps,
                batch_size=batch_size,
                seed=seed,
                augment=augment,
                device=device,
            )
        rows += [
            {
                "method": name,
                "fraction": float(fraction),
                "seed": int(seed),
                "n_labels": len(idx),
                "accuracy": float(acc),
                "probe": "finetune" if name == "supervised" else probe,
                **_probe_fields(info.get(name, {})),
            }
            for name, acc in accuracy.items()
        ]
    return rows
