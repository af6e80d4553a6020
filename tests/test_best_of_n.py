"""The best-of-n estimate over all n-subsets of a pool, against enumerating the subsets."""

import itertools

import numpy as np
import pytest

from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.rlhf import best_of_n_mean


def _enumerated(proxy: np.ndarray, values: np.ndarray, n: int) -> float:
    means = []
    for p, v in zip(proxy, values, strict=True):
        picks = [
            v[list(s)][np.argmax(p[list(s)])] for s in itertools.combinations(range(len(p)), n)
        ]
        means.append(np.mean(picks))
    return float(np.mean(means))


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_best_of_n_mean_equals_the_average_over_every_subset(n: int) -> None:
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, 4, size=(5, 6)).astype(float)  # few levels: many ties
    values = rng.normal(size=(5, 6))
    assert best_of_n_mean(proxy, values, n) == pytest.approx(_enumerated(proxy, values, n))


def test_best_of_1_is_the_plain_mean_and_best_of_pool_the_argmax() -> None:
    rng = np.random.default_rng(1)
    proxy, values = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    assert best_of_n_mean(proxy, values, 1) == pytest.approx(values.mean())
    best = values[np.arange(4), proxy.argmax(1)].mean()
    assert best_of_n_mean(proxy, values, 8) == pytest.approx(best)
    with pytest.raises(SelfsupError, match="pool of 8"):
        best_of_n_mean(proxy, values, 9)


def test_best_of_n_kl_against_enumerating_every_draw() -> None:
    import math

    from selfsup.lm.alignment.rlhf import best_of_n_kl

    # a pool of 5 answers with two identical ones (the same score): the policy's distribution is
    # that pool; best-of-n of n i.i.d. draws, ties broken uniformly among equal answers
    pool = np.array([[0.3, 1.2, 0.3, -0.5, 2.0]])
    for n in (1, 2, 3):
        bon = np.zeros(5)
        for draw in itertools.product(range(5), repeat=n):
            top = max(pool[0, list(draw)])
            winners = [i for i in draw if pool[0, i] == top]
            for i in winners:
                bon[i] += 1 / len(winners) / 5**n
        kl = sum(b * math.log(b / 0.2) for b in bon if b > 0)
        assert best_of_n_kl(pool, n) == pytest.approx(kl, abs=1e-12)
        assert best_of_n_kl(pool, n) <= math.log(n) - (n - 1) / n + 1e-12  # the usual bound
    assert best_of_n_kl(np.zeros((3, 4)), 8) == 0.0  # all answers alike: best-of-n is the policy
