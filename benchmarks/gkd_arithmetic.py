"""Does on-policy distillation (`selfsup lm distill`, GKD) beat SFT alone for a small student?

Builds the offline arithmetic task of docs/rlhf.md in --work: a GPT teacher (--teacher-layers 4)
and a GPT student (--student-layers 1), both pretrained on the task's corpus with one character
tokenizer; the teacher is fine-tuned with `lm sft`. Then, for each seed, the student is trained
for the same number of epochs over the same SFT file in two ways:

- sft:         `lm sft` for --student-sft-epochs + --distill-epochs epochs (one-hot targets);
- sft+distill: `lm sft` for --student-sft-epochs epochs (none: distilled from the pretrained
               student), then `lm distill` from the teacher for --distill-epochs epochs.

Every model is scored on the same held-out prompts (eval.jsonl): one answer each, sampled at
temperature 1 (as lm rlhf's eval.csv) and greedy; `acc` is the share whose first number is the
sum, `gold` the task's gold score (sum right +1, house style +0.5, empty -0.5).

    OMP_NUM_THREADS=1 python benchmarks/gkd_arithmetic.py --work /tmp/gkd-arith --seeds 0,1,2

Writes WORK/results.csv (one row per model and seed) and prints the table with the seconds
each training command took.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from selfsup.cli.main import main as cli

CPU = ["--accelerator", "cpu", "--no-progress"]


def _run(argv: list[str]) -> float:
    """Run one `selfsup` command, unless its --out run is already complete (the seconds it took
    then are read from RUN/wall_s.txt); its wall time in seconds."""
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    if out is not None and (out / "wall_s.txt").is_file():
        return float((out / "wall_s.txt").read_text())
    print("$ selfsup " + " ".join(argv), flush=True)
    start = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"failed: selfsup {' '.join(argv)}")
    wall = time.perf_counter() - start
    if out is not None:
        (out / "wall_s.txt").write_text(f"{wall:.1f}")
    return wall


def build(args: argparse.Namespace) -> dict[str, Path]:
    """The task's files, the two pretrained GPTs and the SFT teacher (reused when present)."""
    work = Path(args.work)
    data = work / "data"
    if not (data / "eval.jsonl").is_file():
        _run(["lm", "arithmetic", str(data), "--num-prompts", str(2 * args.eval_prompts),
              "--sft", str(args.sft_examples), "--max-operand", str(args.max_operand)])  # fmt: skip
    paths = {"data": data, "sft": data / "sft.jsonl"}
    sizes = {"teacher-base": (args.teacher_layers, args.teacher_embd),
             "student-base": (args.student_layers, args.student_embd)}  # fmt: skip
    for name, (layers, width) in sizes.items():
        out = work / name
        _run(["lm", "pretrain", "gpt", "--data", str(data / "corpus.txt"), "--tokenizer",
              "char", "--steps", str(args.pretrain_steps), "--block-size", "64",
              "--batch-size", "32", "--n-layer", str(layers), "--n-embd", str(width),
              "--eval-interval", str(args.pretrain_steps), "--final-eval-batches", "10",
              *CPU, "--out", str(out)])  # fmt: skip
        paths[name] = out
    paths["teacher"] = work / "teacher"
    _run(["lm", "sft", "--init", str(paths["teacher-base"]), "--data", str(paths["sft"]),
          "--epochs", str(args.teacher_epochs), *_sft_knobs(args), *CPU,
          "--out", str(paths["teacher"])])  # fmt: skip
    return paths


def _sft_knobs(args: argparse.Namespace) -> list[str]:
    return ["--lr", str(args.lr), "--batch-size", "16", "--max-length", "64"]


@torch.no_grad()
def score(model_dir: Path, data: Path, n: int) -> dict[str, float]:
    """acc and gold of one sampled (temperature 1, fixed seed) and one greedy answer per
    held-out prompt."""
    from selfsup.lm.alignment.online import load_policy, load_prompts
    from selfsup.lm.alignment.rollout import decode_responses, sample
    from selfsup.lm.data.arithmetic import gold_score, problem_of

    conversations, records = load_prompts(str(data / "eval.jsonl"))
    conversations, problems = conversations[:n], [problem_of(r) for r in records[:n]]
    tokenizer, model = load_policy(model_dir)
    out: dict[str, float] = {}
    for name, top_k in (("sampled", 0), ("greedy", 1)):
        golds = []
        for s in range(0, len(conversations), 64):
            r = sample(model, tokenizer, conversations[s : s + 64], 24, 1.0, top_k, 10_000 + s)
            answers = decode_responses(tokenizer, r)
            golds += [gold_score(problems[s + i], a) for i, a in enumerate(answers)]
        g = np.array(golds)
        out[f"{name}_acc"] = float(np.mean(g >= 1.0))
        out[f"{name}_gold"] = float(np.mean(g))
    return out


def student_arms(args: argparse.Namespace, paths: dict[str, Path], seed: int) -> list[dict]:
    """The two students of one seed: SFT alone, and (SFT then) distillation, equal epochs."""
    work, total = Path(args.work), args.student_sft_epochs + args.distill_epochs
    tag = f"s{seed}"
    rows = []
    alone = work / f"student-sft{total}-lr{args.lr}-{tag}"
    wall = _run(["lm", "sft", "--init", str(paths["student-base"]), "--data", str(paths["sft"]),
                 "--epochs", str(total), *_sft_knobs(args), "--seed", str(seed), *CPU,
                 "--out", str(alone)])  # fmt: skip
    rows.append(dict(model="student sft", epochs=f"{total} sft", seed=seed, wall_s=wall))
    start, wall = paths["student-base"], 0.0
    if args.student_sft_epochs:
        start = work / f"student-sft{args.student_sft_epochs}-lr{args.lr}-{tag}"
        wall = _run(["lm", "sft", "--init", str(paths["student-base"]), "--data",
                     str(paths["sft"]), "--epochs", str(args.student_sft_epochs),
                     *_sft_knobs(args), "--seed", str(seed), *CPU,
                     "--out", str(start)])  # fmt: skip
    distilled = work / f"student-gkd-{args.name}-{tag}"
    wall += _run(["lm", "distill", "--init", str(start), "--teacher", str(paths["teacher"]),
                  "--data", str(paths["sft"]), "--epochs", str(args.distill_epochs),
                  "--beta", str(args.beta), "--lmbda", str(args.lmbda), "--temperature",
                  str(args.temperature), "--lr", str(args.distill_lr or args.lr),
                  "--batch-size", "16", "--max-length", "64", "--seed", str(seed), *CPU,
                  "--out", str(distilled)])  # fmt: skip
    epochs = f"{args.student_sft_epochs} sft + {args.distill_epochs} gkd"
    rows.append(dict(model=f"student gkd {args.name}", epochs=epochs, seed=seed, wall_s=wall))
    for row, folder in zip(rows, (alone, distilled), strict=True):
        row.update(score(folder, paths["data"], args.eval_prompts))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder of the task, models and results")
    p.add_argument("--seeds", default="0", help="comma list: the students' training seeds")
    p.add_argument("--sft-examples", type=int, default=1000)
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--eval-prompts", type=int, default=512)
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-embd", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--student-embd", type=int, default=64)
    p.add_argument("--student-sft-epochs", type=int, default=0, help="SFT before distilling")
    p.add_argument("--distill-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="SFT's (teacher and students)")
    p.add_argument("--distill-lr", type=float, default=0.0, help="distill's (0: --lr)")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--lmbda", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--name", default="", help="label of the distill setting (default: its knobs)")
    args = p.parse_args()
    args.name = args.name or f"b{args.beta}-l{args.lmbda}-t{args.temperature}"
    start = time.perf_counter()
    paths = build(args)
    rows = [dict(model="teacher", epochs=f"{args.teacher_epochs} sft", seed="-", wall_s=0.0,
                 **score(paths["teacher"], paths["data"], args.eval_prompts))]  # fmt: skip
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += student_arms(args, paths, seed)
    results = Path(args.work) / "results.csv"
    new = not results.is_file()
    with results.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print("| model | epochs | seed | sampled acc | sampled gold | greedy acc | greedy gold | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['epochs']} | {r['seed']} | {r['sampled_acc']:.3f} | "
              f"{r['sampled_gold']:.3f} | {r['greedy_acc']:.3f} | {r['greedy_gold']:.3f} | "
              f"{r['wall_s']:.0f} |")  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows[1:]):
        acc = [r["greedy_acc"] for r in rows if r["model"] == model]
        sam = [r["sampled_acc"] for r in rows if r["model"] == model]
        print(
            f"{model}: greedy acc {np.mean(acc):.3f} ± {np.std(acc):.3f}, "
            f"sampled acc {np.mean(sam):.3f} ± {np.std(sam):.3f} over {len(acc)} seeds"
        )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
