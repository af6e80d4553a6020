"""Every image method on CIFAR-10 under one CPU-time budget, then the same few-label probe.

    python benchmarks/cifar_methods.py --budget-minutes 10 --out runs/cifar-methods

For each method: a calibration (two short pretraining runs on 1,024 and 4,096 images give the
seconds per image, free of start-up time), then as many whole epochs as fit the budget (at least
one), then `selfsup evaluate` with a linear probe at 1%, 10% and 100% of the labels. SimCLR's
evaluation adds the raw-pixel, PCA and random-init baselines; MAE's adds its own random-init
ViT. Jobs run in `--lanes` parallel subprocesses with `--threads` torch threads each (2 x 1 on a
2-core machine keeps every job under the same load). Prints a markdown table (also in
OUT/table.md) with each method's epochs and measured training minutes, and draws the few-label
curves of every method and baseline (OUT/few-label.png). `--redraw` rebuilds the table and the
picture from OUT/results.json without training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = "npz:" + str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
METHODS = (
    "simclr",
    "supcon",
    "autoencoder",
    "rotation",
    "jigsaw",
    "colorization",
    "inpainting",
    "mae",
)
BASELINES = {"simclr": "raw,pca,random", "mae": "random"}
TRAIN_SIZE = 50_000


def selfsup(args: list[str], threads: int, log: Path) -> float:
    """Run `selfsup ARGS` in a subprocess; return its wall seconds (raise on failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # no HTML report: its t-SNE grows with the run's images and would skew the calibration
    env["SELFSUP_REPORT"] = "0"
    began = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ selfsup {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(
            [sys.executable, "-m", "selfsup", *args], stdout=out, stderr=out, env=env
        )
    if done.returncode:
        raise RuntimeError(f"selfsup {' '.join(args)} failed; see {log}")
    return time.perf_counter() - began


def method_job(method: str, args: argparse.Namespace) -> dict:
    out = Path(args.out)
    log = out / f"{method}.log"
    backbone = "vit-mini" if method == "mae" else "convnet"  # mae needs a ViT: its CPU one
    common = ["--data", args.data, "--backbone", backbone]
    common += ["--batch-size", "256", "--seed", "0", "--no-online-probe"]
    seconds = {}
    for n in (1024, 4096):
        run = out / "calibration" / f"{method}-{n}"
        seconds[n] = selfsup(
            ["pretrain", method, *common, "--limit", str(n), "--epochs", "1", "--out", str(run)],
            args.threads,
            log,
        )
    per_image = max(1e-6, (seconds[4096] - seconds[1024]) / 3072)
    epochs = max(1, round(args.budget_minutes * 60 / (per_image * TRAIN_SIZE)))
    run = out / method
    train = selfsup(
        ["pretrain", method, *common, "--epochs", str(epochs), "--out", str(run)], args.threads, log
    )
    evaluate = ["evaluate", str(run), "--fractions", "0.01,0.1,1", "--seeds", str(args.seeds)]
    evaluate += ["--baselines", BASELINES.get(method, "none"), "--no-kmeans"]
    selfsup(evaluate, args.threads, log)
    results = json.loads(next((run / "eval").glob("*/results.json")).read_text())
    return {
        "method": method,
        "epochs": epochs,
        "images_per_second": round(1 / per_image, 1),
        "train_minutes": round(train / 60, 1),
        "few_label": results["few_label"],
    }


def table(jobs: list[dict]) -> str:
    lines = [
        "| method | epochs | train min | 1% labels | 10% labels | 100% labels |",
        "|---|---|---|---|---|---|",
    ]
    baselines: dict[str, list[dict]] = {}
    for job in jobs:
        own = [r for r in job["few_label"] if r["method"] == "selfsup"]
        lines.append(
            f"| {job['method']} | {job['epochs']} | {job['train_minutes']} | " + _cells(own) + " |"
        )
        for row in job["few_label"]:
            if row["method"] != "selfsup":
                name = row["method"] + (" (ViT)" if job["method"] == "mae" else "")
                baselines.setdefault(name, []).append(row)
    for name, rows in baselines.items():
        lines.append(f"| {name} | | | " + _cells(rows) + " |")
    return "\n".join(lines) + "\n"


FRACTIONS = (0.01, 0.1, 1.0)


def _accuracies(rows: list[dict], fraction: float) -> list[float]:
    return [100 * r["accuracy"] for r in rows if r["fraction"] == fraction]


def _cells(rows: list[dict]) -> str:
    cells = []
    for fraction in FRACTIONS:
        accs = _accuracies(rows, fraction)
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / max(1, len(accs) - 1)) ** 0.5
        cells.append(f"{mean:.1f} ± {std:.1f}" if len(accs) > 1 else f"{mean:.1f}")
    return " | ".join(cells)


def plot(jobs: list[dict], path: Path) -> None:
    """Few-label curves: linear-probe accuracy against the label fraction, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5) if len(jobs) <= 10 else (8, 6))
    colours = plt.get_cmap("tab10" if len(jobs) <= 10 else "tab20").colors
    baselines: dict[str, list[dict]] = {}
    for job, colour in zip(jobs, colours, strict=False):
        own = [r for r in job["few_label"] if r["method"] == "selfsup"]
        xs = [100 * f for f in FRACTIONS]
        ax.plot(xs, _means(own), marker="o", label=job["method"], color=colour)
        for row in job["few_label"]:
            if row["method"] != "selfsup":
                name = row["method"] + (" (ViT)" if job["method"] == "mae" else "")
                baselines.setdefault(name, []).append(row)
    for name, rows in baselines.items():
        xs = [100 * f for f in FRACTIONS]
        ax.plot(xs, _means(rows), linestyle=":", color="black", alpha=0.7, marker="x")
        ax.annotate(f" {name}", (xs[-1], _means(rows)[-1]), fontsize=8, va="center")
    ax.set_xscale("log")
    ax.set_xticks([1, 10, 100], ["1%", "10%", "100%"])
    ax.set_xlim(0.7, 300)
    ax.set_xlabel("labels used by the linear probe (% of CIFAR-10's 50,000)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("CIFAR-10, one CPU budget per method; dotted: baselines")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _means(rows: list[dict]) -> list[float]:
    return [sum(a) / len(a) for a in (_accuracies(rows, f) for f in FRACTIONS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--seeds", type=int, default=2, help="label subsets per fraction")
    parser.add_argument("--lanes", type=int, default=2, help="jobs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--out", default="runs/cifar-methods")
    parser.add_argument("--redraw", action="store_true", help="table and picture from OUT only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.redraw:
        jobs = json.loads((out / "results.json").read_text())
        print(_finish(jobs, out))
        return
    methods = args.methods.split(",")
    with ThreadPoolExecutor(args.lanes) as pool:
        futures = [pool.submit(method_job, m, args) for m in methods]
        jobs = []
        for future in futures:
            try:
                jobs.append(future.result())
            except RuntimeError as e:
                print(e, file=sys.stderr)
            else:
                (out / "results.json").write_text(json.dumps(jobs, indent=2) + "\n")
    print(_finish(jobs, out))


def _finish(jobs: list[dict], out: Path) -> str:
    text = table(jobs)
    (out / "table.md").write_text(text)
    plot(jobs, out / "few-label.png")
    return text


if __name__ == "__main__":
    main()
