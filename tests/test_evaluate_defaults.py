"""`selfsup evaluate`'s defaults stay about a minute on a CPU (issue 34.7): a run is evaluated at
its own size, and the supervised reference is opt-in with its cost said before it starts."""

from __future__ import annotations

import shutil

import numpy as np
import yaml

import selfsup
from selfsup.core.run import read_config
from selfsup.image.config import EvalConfig
from selfsup.image.data import load_splits
from selfsup.image.evaluation.few_label import labeled_subset, supervised_cost
from selfsup.image.models import Encoder


def test_a_limited_run_is_evaluated_at_its_own_size_without_the_supervised_net(
    digits_run, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["limit"] = 300  # as `selfsup pretrain ... --limit 300` records it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert "supervised" not in EvalConfig().baseline_list()
    results = selfsup.evaluate(run, fractions="0.1", seeds=1, kmeans=False)
    assert (results["train_size"], results["test_size"]) == (300, 300)
    assert {r["method"] for r in results["few_label"]} == {"selfsup", "raw", "pca", "random"}
    assert "the run's own --limit 300" in capsys.readouterr().err
    # another dataset, or an explicit --limit, is not cut to the run's size
    results = selfsup.evaluate(run, fractions="0.1", seeds=1, kmeans=False, limit=500)
    assert results["train_size"] == 500


def test_the_supervised_cost_counts_the_steps_it_will_take(digits_run):
    train, _ = load_splits("digits")
    y = train.y.numpy()
    subsets = [labeled_subset(y, 0.035, seed) for seed in (0, 1)]  # 5 labels a class: 50
    assert [len(s) for s in subsets] == [50, 50]
    # by hand: 50 labels, 10 held out for early stopping -> 40 to fit, one batch an epoch;
    # 30 epochs = 30 steps, raised to the 100-step minimum: 100 per network, 200 in all
    line = supervised_cost(
        lambda: Encoder(**read_config(digits_run)["encoder"]),
        train,
        subsets,
        epochs=30,
        max_steps=None,
        batch_size=256,
        augment="light",
        device="cpu",
    )
    assert line.startswith("supervised reference: 2 networks, up to 200 steps in all, about ")
    assert " ms a step" in line and np.isfinite(float(line.split("(")[1].split()[0]))
