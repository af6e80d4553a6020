"""Distillation on CIFAR-10 (issue 35): a teacher, the small ConvNet distilled from it, and the same
ConvNet trained from scratch by an SSL method for the same time, under one few-label probe.

    python benchmarks/distill_cifar.py --out runs/distill-cifar          # the issue's measurement
    python benchmarks/distill_cifar.py --teacher RUN --out ...          # an existing teacher run
    python benchmarks/distill_cifar.py --quick --out /tmp/distill-quick  # minutes: a smoke test

Teacher: `--teacher RUN` (a selfsup run folder), else `--teacher-method` (simclr) on
`--teacher-backbone` (resnet18) for `--teacher-minutes` (30). Student: `selfsup pretrain distill`
of the ConvNet for `--student-minutes` (10, `--loss` cosine). Scratch: `--scratch-method`
(simclr) on the ConvNet for the same minutes. A time budget becomes whole epochs as in
benchmarks/cifar_methods.py, from the images/s of one short calibration run's training loop. The
teacher's training and the scratch run share `--lanes` 2 lanes of `--threads` 1 thread; the
student runs after the teacher, beside nothing. Then `selfsup evaluate` on each: linear probe at
1%, 10%, 100% of the labels, `--seeds` label subsets. Prints a markdown table (OUT/table.md,
OUT/results.json). `--quick`: 2,048 training images, budgets of 0.3 minutes, a ConvNet teacher, a
2,000-image evaluation, one label subset.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cifar_methods import DATA, TRAIN_SIZE, _cells, selfsup  # noqa: E402


def train_for(
    name: str, method: str, extra: list[str], minutes: float, args: argparse.Namespace
) -> dict:
    """Pretrain `method` (`extra` its options) for about `minutes`: calibrate, then epochs."""
    out, log = Path(args.out), Path(args.out) / f"{name}.log"
    common = ["--data", args.data, "--batch-size", "256", "--seed", "0", "--no-online-probe"]
    common += extra
    calibration = out / "calibration" / name
    n = 512 if args.quick else 4096
    short = ["pretrain", method, *common, "--limit", str(n), "--epochs", "1"]
    selfsup([*short, "--out", str(calibration)], args.threads, log)
    # the training loop's own rate (run_info.json): data loading and start-up left out
    info = json.loads((calibration / "run_info.json").read_text())
    per_image = 1 / info["sessions"][-1]["images_per_second"]
    size = args.limit or TRAIN_SIZE
    epochs = max(1, round(minutes * 60 / (per_image * size)))
    limit = ["--limit", str(args.limit)] if args.limit else []
    run = out / name
    train = selfsup(
        ["pretrain", method, *common, *limit, "--epochs", str(epochs), "--out", str(run)],
        args.threads,
        log,
    )
    return {"name": name, "method": method, "run": str(run), "epochs": epochs,
            "train_minutes": round(train / 60, 1)}  # fmt: skip


def evaluate(job: dict, args: argparse.Namespace) -> dict:
    """The run's few-label linear probe (1%, 10%, 100%)."""
    run = Path(job["run"])
    command = ["evaluate", str(run), "--fractions", "0.01,0.1,1", "--seeds", str(args.seeds)]
    command += ["--baselines", "none", "--no-kmeans"]
    command += ["--limit", str(args.eval_limit)] if args.eval_limit else []
    selfsup(command, args.threads, Path(args.out) / f"{job['name']}.log")
    results = json.loads(max((run / "eval").glob("*/results.json"), key=_mtime).read_text())
    return {**job, "few_label": [r for r in results["few_label"] if r["method"] == "selfsup"]}


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def table(jobs: list[dict]) -> str:
    lines = ["| encoder | method | epochs | train min | 1% labels | 10% labels | 100% labels |"]
    lines.append("|---|---|---|---|---|---|---|")
    for job in jobs:
        minutes = job.get("train_minutes", "")
        lines.append(
            f"| {job['name']} | {job['method']} | {job.get('epochs', '')} | {minutes} | "
            + _cells(job["few_label"])
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", help="an existing selfsup run as the teacher")
    parser.add_argument("--teacher-method", default="simclr")
    parser.add_argument("--teacher-backbone", help="default resnet18 (--quick: convnet)")
    parser.add_argument("--teacher-minutes", type=float, default=30.0)
    parser.add_argument("--student-minutes", type=float, default=10.0)
    parser.add_argument("--scratch-method", default="simclr")
    parser.add_argument("--loss", default="cosine", help="distill's --loss")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--limit", type=int, help="pretrain on the first N training images")
    parser.add_argument("--eval-limit", type=int, help="evaluate on N training and test images")
    parser.add_argument("--seeds", type=int, default=2, help="label subsets per fraction")
    parser.add_argument("--lanes", type=int, default=2, help="jobs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--quick", action="store_true", help="a few minutes: a smoke test")
    parser.add_argument("--out", default="runs/distill-cifar")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.eval_limit, args.seeds = args.limit or 2048, args.eval_limit or 2000, 1
        args.teacher_minutes = args.student_minutes = 0.3
        args.teacher_backbone = args.teacher_backbone or "convnet"  # a ResNet step takes minutes
    args.teacher_backbone = args.teacher_backbone or "resnet18"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_options = ["--backbone", args.teacher_backbone]
    with ThreadPoolExecutor(args.lanes) as pool:
        scratch = pool.submit(
            train_for, "scratch", args.scratch_method, ["--backbone", "convnet"],
            args.student_minutes, args,
        )  # fmt: skip
        if args.teacher:
            teacher = {"name": "teacher", "method": "(given)", "run": args.teacher}
        else:
            teacher = pool.submit(
                train_for, "teacher", args.teacher_method, teacher_options,
                args.teacher_minutes, args,
            ).result()  # fmt: skip
        student_options = ["--backbone", "convnet", "--teacher", teacher["run"]]
        student = train_for(
            "student",
            "distill",
            [*student_options, "--loss", args.loss],
            args.student_minutes,
            args,
        )
        jobs = [teacher, student, scratch.result()]
        jobs = list(pool.map(lambda job: evaluate(job, args), jobs))
    (out / "results.json").write_text(json.dumps(jobs, indent=2) + "\n")
    text = table(jobs)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
