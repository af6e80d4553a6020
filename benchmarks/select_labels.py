"""Which images to label: a linear probe trained on the images a strategy picks, against the
same probe on uniformly random images (not stratified: a user does not know the classes).

    python benchmarks/select_labels.py RUN                      # the run's own data
    python benchmarks/select_labels.py RUN --budgets 10,20,50,100,500 --seeds 3

Prints, per budget, the test accuracy (mean ± std over seeds) of typiclust, kcenter and random,
and the gain of each strategy over random. Where the budget is a multiple of the number of
classes, a last column shows a ceiling that no label-blind strategy can be asked to pass: the
same number of images from every class, those nearest their class's mean embedding (it reads
the labels; a reference, not a strategy). The strategies see only the embeddings; the labels
of the chosen images are then read from the dataset, as a person would provide them. The probe
is `selfsup evaluate`'s: features standardised with the statistics of all training images (no
labels needed: the user has the images), C by cross-validation inside the chosen images (fixed
below two labels per class).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from selfsup.image.evaluation import extract_features
from selfsup.image.evaluation.probes import Preconditioner, probe_accuracy, standardize
from selfsup.image.runs import dataset_for, load
from selfsup.image.use.select import STRATEGIES, choose, unit_rows


def class_centroid_picks(features: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """The `per_class` images of each class nearest (cosine) its class's mean embedding."""
    z = unit_rows(features)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        centre = unit_rows(z[members].mean(0, keepdims=True))[0]
        picks += list(members[np.argsort(-(z[members] @ centre))[:per_class]])
    return np.asarray(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--budgets", default="10,20,50,100,500")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    encoder = load(args.run)
    train, test = dataset_for(args.run, split="train"), dataset_for(args.run, split="test")
    train_f = extract_features(encoder, train, progress=False)
    test_f = extract_features(encoder, test, progress=False)
    train_y, test_y = train.y.numpy(), test.y.numpy()
    train_x, test_x = standardize(train_f, test_f)  # as `selfsup evaluate` does
    precondition = Preconditioner(train_x)
    print(f"{args.run}: choosing from {len(train)} images, testing on {len(test)}")
    classes = len(np.unique(train_y))
    header = "  ".join(f"{s:>14}" for s in STRATEGIES)
    print(f"{'budget':>6}  {header}  gain over random  (class-centroid ceiling)")
    for budget in (int(b) for b in args.budgets.split(",")):
        if budget > len(train):
            continue
        scores: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        for seed in range(args.seeds):
            for strategy in STRATEGIES:
                start = time.perf_counter()
                picks = choose(train_f, budget, strategy, seed)
                seconds = time.perf_counter() - start
                chosen = torch.as_tensor(picks)
                accuracy = probe_accuracy(
                    train_x[chosen], train_y[picks], test_x, test_y, precondition=precondition
                )
                scores[strategy].append(100 * accuracy)
                if seed == 0 and strategy != "random" and seconds > 5:
                    print(f"  ({strategy} took {seconds:.1f} s at budget {budget})")
        cells = [f"{np.mean(v):6.1f} ± {np.std(v):4.1f}" for v in scores.values()]
        base = np.mean(scores["random"])
        gains = [f"{s} {np.mean(scores[s]) - base:+.1f}" for s in STRATEGIES if s != "random"]
        ceiling = ""
        if budget % classes == 0:
            picks = class_centroid_picks(train_f, train_y, budget // classes)
            chosen = torch.as_tensor(picks)
            accuracy = probe_accuracy(
                train_x[chosen], train_y[picks], test_x, test_y, precondition=precondition
            )
            ceiling = f"  ({100 * accuracy:.1f}, {100 * accuracy - base:+.1f})"
        print(f"{budget:>6}  " + "  ".join(cells) + "  " + ", ".join(gains) + ceiling)


if __name__ == "__main__":
    main()
