"""The run-level Python API: the image half's pretrain (with its report) and evaluate (`load`
and `embed` come from `selfsup.image.runs`); the language half's stages after pretraining,
`align` (with its report, as `selfsup lm STAGE` writes it)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.engine.device import resolve_device
from selfsup.image.augment.recipes import RECIPES
from selfsup.image.config import EvalConfig, PretrainConfig
from selfsup.image.data import ImageData, load_splits, stratified_indices
from selfsup.image.evaluation import (
    check_options,
    extract_features,
    few_label_evaluation,
    finetune,
    format_table,
    kmeans_scores,
    knn_accuracy,
    labeled_subset,
    linear_probe,
    noise_levels,
    plot_few_label,
    plot_label_noise,
    supervised_rule,
    write_results,
)
from selfsup.image.evaluation.few_label import Pixels, train_supervised
from selfsup.image.evaluation.probes import fit_probe
from selfsup.image.evaluation.shift import corruption_list, shift_evaluation
from selfsup.image.models import Encoder
from selfsup.image.runs import _adapt, _folder_size, load


def pretrain(
    config: PretrainConfig | None = None,
    *,
    command: str | None = None,
    report: bool = True,
    **options: Any,
) -> Path:
    """Pretrain a self-supervised encoder (`selfsup.image.train.pretrain`, which says more);
    returns the run directory. `report=False` skips RUN/report.html at the end."""
    from selfsup.image import train  # Lightning: only when an image run trains

    run = train.pretrain(config, command=command, **options)
    if report and rundir.is_first_process() and os.environ.get("SELFSUP_REPORT", "1") != "0":
        from selfsup.reporting import write_run_report

        train.say(f"writing the report {run / 'report.html'} (encodes the data once more) ...")
        write_run_report(run)
    return run


def align(
    stage: str,
    options: Any = None,
    *,
    command: str | None = None,
    report: bool = True,
    **values: Any,
) -> Path | None:
    """Run the language stage `stage` of the ALIGN registry (sft, reward, dpo, grpo, rlhf, ...)
    as `selfsup lm STAGE` does, with its `Options` (given, or made from `values`: the command's
    option names with _), and write RUN/report.html as the command does (`report=False` skips
    it); returns the run directory (None for a stage that writes none)."""
    return run_stage(stage, options, command=command, report=report, **values)[0]


def run_stage(
    stage: str,
    options: Any = None,
    *,
    command: str | None = None,
    report: bool = True,
    **values: Any,
) -> tuple[Path | None, Path | None]:
    """`align`'s work: (the run directory, its report page or None when none was written)."""
    from selfsup.lm.alignment import ALIGN

    if stage not in ALIGN:
        raise SelfsupError(f"unknown stage {stage!r}; expected one of {', '.join(ALIGN)}")
    kind = ALIGN.load(stage)
    if options is None:
        names = {f.name for f in dataclasses.fields(kind.Options)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SelfsupError(f"{stage}: {', '.join(unknown)} is not an option of this stage")
        options = kind.Options(**values)
    elif values:
        raise SelfsupError(f"{stage}: give its Options or option values, not both")
    run = kind.run(options, command=command)
    if run is None:
        return None, None
    if not report or not rundir.is_first_process():
        return Path(run), None
    from selfsup.reporting import write_run_report

    return Path(run), write_run_report(run)


@rundir.releases_run_locks
def evaluate(run: str | Path, config: EvalConfig | None = None, **options: Any) -> dict[str, Any]:
    """Linear probe, kNN, k-means and the few-label table with baselines; writes RUN/eval/<data>/.

    Returns a dict with the results (also written as JSON/CSV next to the plots).
    """
    config = dataclasses.replace(config or EvalConfig(), **options)
    seeds = tuple(range(config.seeds))
    check_options(
        config.fraction_list(),
        seeds,
        config.baseline_list(),
        config.probe,
        config.probe_c,
        config.cv_folds,
        _noise_rates(config.label_noise),
    )
    if config.shift:
        corruption_list(config.shift)  # an unknown name: one line before any work
    run = Path(run)
    run_config = rundir.read_config(run)
    rundir.lock_run(run)  # it writes RUN/eval/: one writer per run folder
    encoder = load(run)
    device = resolve_device(config.device)
    train, test = _splits(run_config, config)
    if not train.has_labels:
        raise SelfsupError(f"--data {train.name} has no labels: evaluation needs labeled data")

    train_f = extract_features(encoder, train, batch_size=config.batch_size, device=device)
    test_f = extract_features(encoder, test, batch_size=config.batch_size, device=device)
    train_y, test_y = train.y.numpy(), test.y.numpy()  # type: ignore[union-attr]
    rows = few_label_evaluation(
        encoder,
        train,
        test,
        fractions=config.fraction_list(),
        seeds=seeds,
        baselines=config.baseline_list(),
        random_encoder=lambda: Encoder(**run_config["encoder"]),
        probe=config.probe,
        supervised_steps=config.supervised_max_steps,
        supervised_epochs=config.supervised_epochs,
        batch_size=config.batch_size,
        augment=_supervised_augment(config, run_config),
        device=device,
        features=(train_f, test_f),
        probe_c=config.probe_c,
        cv_folds=config.cv_folds,
        cv_max_samples=config.cv_max_samples,
        label_noise=_noise_rates(config.label_noise),
    )
    full = [
        r
        for r in rows
        if r["method"] == "selfsup" and r["fraction"] == 1.0 and not r.get("label_noise")
    ]
    labeled = train_y >= 0
    probe_details: dict = {}
    results: dict[str, Any] = {
        "run": str(run),
        "data": train.name,
        "data_dir": config.data_dir
        if config.data
        else config.data_dir or run_config.get("data_dir"),
        "train_size": len(train),
        "test_size": len(test),
        "probe": config.probe,
        "supervised_steps": config.supervised_steps,
        "supervised_rule": supervised_rule(config.supervised_epochs, config.supervised_max_steps),
        "linear_probe": full[0]["accuracy"]
        if full and config.probe == "linear"
        else linear_probe(
            train_f[labeled],
            train_y[labeled],
            test_f,
            test_y,
            C=config.probe_c,
            folds=config.cv_folds,
            device=device,
            details=probe_details,
            cv_max_samples=config.cv_max_samples,
        ),
        "knn": knn_accuracy(train_f[labeled], train_y[labeled], test_f, test_y, k=config.knn_k),
    }
    c_row = full[0] if full and config.probe == "linear" else probe_details
    if "C" in c_row:
        results["linear_probe_C"] = c_row["C"]
    if config.kmeans:
        n_classes = len(np.unique(test_y[test_y >= 0]))
        results["kmeans"] = kmeans_scores(test_f[test_y >= 0], test_y[test_y >= 0], n_classes)
    if config.finetune != "none":
        rows += _finetune_rows(encoder, train, test, config, seeds, device)
    results["few_label"] = rows
    if config.shift:
        results["shift_corruptions"] = list(corruption_list(config.shift))
        results["shift"] = _shift_results(
            config, run_config, encoder, train, test, (train_f, test_f), device
        )

    out = rundir.inside_run(run, "eval", rundir.slug(train.name))
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out)
    plot_few_label(rows, out / "few_label.png")
    if noise_levels(rows):
        plot_label_noise(rows, out / "label_noise.png")
    if "shift" in results:
        _plot_shift(results["shift"], out / "shift.png")
    _plot_embeddings(test_f, test_y, out / "embeddings.png", test.classes)
    rundir.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    results["table"] = format_table(rows) + "".join(
        f"\n\nthe probe trained with {100 * rate:g}% of its labels flipped (test labels clean):\n"
        + format_table(rows, rate)
        for rate in noise_levels(rows)
    )
    results["out"] = str(out)
    from selfsup.reporting import write_run_report

    report = write_run_report(run)
    if report is not None:
        results["report"] = str(report)
    return results


def _finetune_rows(
    encoder: Encoder,
    train: ImageData,
    test: ImageData,
    config: EvalConfig,
    seeds: tuple[int, ...],
    device: str,
) -> list[dict]:
    """Fine-tuned encoder accuracy on the same labeled subsets as the few-label table."""
    rows = []
    for fraction in config.fraction_list():
        for seed in seeds:
            subset = labeled_subset(train.y.numpy(), fraction, seed)
            accuracy = finetune(
                encoder,
                train.subset(subset),
                test,
                trainable=config.finetune,
                lr=1e-3,
                batch_size=config.batch_size,
                seed=seed,
                device=device,
                steps=config.supervised_steps,
                augment=config.augment,
            )
            rows.append(
                {
                    "method": f"finetune ({config.finetune})",
                    "fraction": fraction,
                    "seed": seed,
                    "n_labels": len(subset),
                    "accuracy": accuracy,
                    "probe": "finetune",
                }
            )
    return rows


def _shift_results(
    config: EvalConfig,
    run_config: dict,
    encoder: Encoder,
    train: ImageData,
    test: ImageData,
    features_of_run: tuple[np.ndarray, np.ndarray],
    device: str,
) -> dict[str, Any]:
    """Distribution shift: selfsup's probe beside raw pixels and the random-init encoder, and
    the supervised reference (those of --baselines), each trained once on the clean labeled
    training images (the supervised network by `supervised_rule`, seed 0)."""
    labeled = train.y.numpy() >= 0  # type: ignore[union-attr]
    train_l = train.subset(np.flatnonzero(labeled))

    def encoded(model: torch.nn.Module):
        def features(images: Any) -> np.ndarray:
            data = images if isinstance(images, ImageData) else ImageData(images, None, None, "")
            return extract_features(
                model, data, batch_size=config.batch_size, device=device, progress=False
            )

        return features

    encoders = {"selfsup": encoded(encoder)}
    if "raw" in config.baseline_list():
        encoders["raw"] = encoded(Pixels())
    if "random" in config.baseline_list():
        encoders["random"] = encoded(Encoder(**run_config["encoder"]))
    classifiers = {}
    if "supervised" in config.baseline_list():
        model, _ = train_supervised(
            lambda: Encoder(**run_config["encoder"]),
            train_l,
            test,
            seed=0,
            epochs=config.supervised_epochs,
            max_steps=config.supervised_max_steps,
            batch_size=config.batch_size,
            augment=_supervised_augment(config, run_config),
            device=device,
        )
        classifiers["supervised"] = lambda images: encoded(model)(images).argmax(1)
    test_x = test.images(range(len(test)))
    return shift_evaluation(
        encoders,
        train_l,
        train.y.numpy()[labeled],  # type: ignore[union-attr]
        test_x,
        test.y.numpy(),  # type: ignore[union-attr]
        corruption_list(config.shift),
        probe=lambda f, y: (
            fit_probe(
                f, y, C=config.probe_c, folds=config.cv_folds, cv_max_samples=config.cv_max_samples
            ).predict
        ),
        clean={"selfsup": (features_of_run[0][labeled], features_of_run[1])},
        classifiers=classifiers,
    )


def _plot_shift(shift: dict[str, Any], out: Path) -> None:
    """Accuracy against severity (mean over the corruptions), one line per representation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name, row in shift.items():
        curves = [v for k, v in row.items() if isinstance(v, list)]
        mean = [100 * row["clean"]] + [100 * float(np.mean(s)) for s in zip(*curves, strict=True)]
        ax.plot(range(4), mean, marker="o", label=name)
    ax.set_xticks(range(4), ["clean", "1", "2", "3"])
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("accuracy (%), mean over corruptions")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100, bbox_inches="tight")


def _noise_rates(text: str) -> tuple[float, ...]:
    """--label-noise "0.2,0.4" -> (0.2, 0.4)."""
    try:
        return tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise SelfsupError(
            f"--label-noise {text!r}: expected comma-separated rates like 0.2,0.4"
        ) from None


def _supervised_augment(config: EvalConfig, run_config: dict) -> str:
    """--supervised-augment, else the run's pretraining recipe, else --augment."""
    if config.supervised_augment:
        return config.supervised_augment
    recipe = run_config.get("recipe")
    return recipe if recipe in RECIPES else config.augment


def _splits(run_config: dict, config: EvalConfig) -> tuple[ImageData, ImageData]:
    spec = config.data or run_config["data"]
    data_dir = config.data_dir if config.data else config.data_dir or run_config.get("data_dir")
    limit = config.limit
    if limit is None and spec == run_config["data"] and run_config.get("limit"):
        limit = run_config["limit"]  # a run pretrained on N images is evaluated at its size
        print(
            f"evaluating on the run's own --limit {limit} images of {spec} (and at most {limit} "
            "test images); --limit N to change",
            file=sys.stderr,
        )
    train, test = load_splits(
        spec,
        data_dir=data_dir,
        download=config.download,
        limit=limit,
        image_size=_folder_size(spec, run_config),
    )
    if test is None:  # load_splits holds out a test split of every labeled source
        raise SelfsupError(f"--data {spec} has no labels: evaluation needs labeled data")
    if limit is not None and len(test) > limit:  # small tries stay small
        test = test.subset(stratified_indices(test.y, limit, seed=None))
    shape = rundir.input_shape(run_config)
    return _adapt(train, shape), _adapt(test, shape)


def _plot_embeddings(f: np.ndarray, y: np.ndarray, out: Path, classes: list[str] | None) -> None:
    """A 2-D PCA picture of the test embeddings, coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from selfsup.image.evaluation.features import embedding_problem

    keep = np.arange(len(f))[:5000]
    problem = embedding_problem(f[keep])
    if problem is not None:  # no PCA of it: the picture says why
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.text(0.5, 0.5, f"no map: {problem}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return
    xy = PCA(2, random_state=0).fit_transform(f[keep])
    fig, ax = plt.subplots(figsize=(5, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=y[keep], cmap="tab10", s=4)
    if classes and len(classes) <= 20:
        handles = scatter.legend_elements()[0]
        ax.legend(handles, classes[: len(handles)], fontsize=7, markerscale=0.8, loc="best")
    ax.set_title("test embeddings (PCA to 2-D)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
