"""`selfsup lm` commands for the stages after pretraining: SFT, labeling, reward model, RLHF,
best-of-n and chat (added to the group's COMMANDS in `selfsup.cli.lm.main`)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Any

from selfsup.cli.lm.common import (
    add_config_arguments,
    add_config_file,
    add_deprecated,
    deprecation,
    report_line,
    summary,
)
from selfsup.core.errors import SelfsupError
from selfsup.lm.options import TRUNCATE_HELP, RLHFConfig, TuneConfig


def _config(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _add_arithmetic(sub, parents) -> None:
    p = sub.add_parser(
        "arithmetic",
        parents=parents,
        help="write the offline RLHF task's files (corpus, demonstrations, prompts)",
        description="Write corpus.txt, sft.jsonl, label.jsonl, rl.jsonl and eval.jsonl of the "
        "addition task whose gold score stands in for human preferences.",
    )
    p.add_argument("folder", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft", type=int, default=2000, help="demonstrations (default: 2000)")
    p.add_argument(
        "--num-prompts", type=int, default=512, help="prompts per prompt file (default: 512)"
    )
    add_deprecated(p, "--prompts", "num_prompts", "--num-prompts", type=int)
    p.add_argument(
        "--max-operand", type=int, default=50, help="operands from 0 to this (default: 50)"
    )
    p.set_defaults(handler=_run_arithmetic)


def _run_arithmetic(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.data.arithmetic import write_task

    for name, count in write_task(
        args.folder, args.seed, args.sft, args.num_prompts, args.max_operand
    ).items():
        print(f"{args.folder}/{name}: {count} {'lines' if name.endswith('txt') else 'records'}")


def _add_tune(sub, parents, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name,
        parents=parents,
        help=help_text,
        description=help_text + "; writes a run directory (training counted in --epochs).",
    )
    add_config_arguments(p, TuneConfig, skip=("resume",))
    p.add_argument(
        "--resume",
        metavar="RUN",
        nargs="?",
        const=True,
        help="continue the run in this directory from its last epoch (--init and --data "
        "default to the run's own)",
    )
    add_deprecated(p, "--no-resume", "resume", "leave it out (a new run is the default)", nargs=0)
    add_config_file(p)
    p.set_defaults(handler=_run_tune, stage=name, config_class=TuneConfig)


def _add_sft(sub, parents) -> None:
    _add_tune(sub, parents, "sft", "supervised fine-tuning on conversations (assistant tokens)")


def _add_reward(sub, parents) -> None:
    _add_tune(sub, parents, "reward", "train a reward model from rankings like 'D > C > A = B'")


def _run_tune(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.training.posttrain import sft, train_reward

    if args.resume is True:  # the bare flag of before `--resume RUN`
        deprecation("--resume without RUN", "--resume RUN")
    config = _config(TuneConfig, args)
    run = Path((sft if args.stage == "sft" else train_reward)(config, command=command))
    last = _last_row(run / "metrics.csv")
    q = shlex.quote(str(run))
    if args.stage == "sft":
        metric = _metric_line(last, ("val_loss", "train_loss"))
        after = f"selfsup lm chat {q}  (or: selfsup lm label {q} --prompts P.jsonl -o R.jsonl)"
    else:
        metric = _metric_line(last, ("val_pair_acc", "val_loss", "train_loss"))
        after = f"selfsup lm rlhf --policy SFT_RUN --reward {q} --prompts P.jsonl --out OUT"
    summary(
        [
            f"run directory: {run}/ (hf/ the Hugging Face model, metrics.csv, checkpoint)",
            metric,
            report_line(run),
            f"next: {after}",
        ]
    )


def _last_row(path: Path) -> dict[str, str]:
    """The last row of a metrics.csv (empty if there is none)."""
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def _metric_line(
    row: dict[str, str], names: tuple[str, ...], step: str = "epoch", file: str = "metrics.csv"
) -> str:
    """`val loss 1.234, ... after epoch 3 (metrics.csv)` from a metrics row ("" if none)."""
    shown = [f"{n.replace('_', ' ')} {float(row[n]):.4g}" for n in names if row.get(n)]
    where = f" after {step} {row[step]}" if row.get(step) else ""
    return f"{', '.join(shown)}{where} ({file})" if shown else ""


def _add_label(sub, parents) -> None:
    p = sub.add_parser(
        "label",
        parents=parents,
        help="sample K answers per prompt and rank them with simulated labelers",
    )
    p.add_argument("policy", help="the model whose answers are ranked (an SFT run)")
    p.add_argument("--prompts", required=True, help="JSONL of prompts")
    p.add_argument("-o", "--output", required=True, help="rankings JSONL to write")
    p.add_argument("--k", type=int, default=4, help="answers per prompt (default: 4)")
    p.add_argument("--gold", default="arithmetic", help="the gold score labelers rank by")
    p.add_argument("--noise", type=float, default=0.2, help="labelers' noise (std of the score)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--truncate", action="store_true", help=TRUNCATE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_label)


def _run_label(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.alignment.rlhf import label

    stats = label(
        args.policy, args.prompts, args.output, args.k, args.gold, args.noise,
        args.max_new_tokens, args.seed, args.truncate,
    )  # fmt: skip
    print(
        f"{args.output}: {stats['prompts']} ranked prompts, "
        f"{100 * stats['with_ties']:.0f}% with ties, {stats['pairs']} strictly ordered pairs; "
        f"a second labeler agrees on {100 * stats['labeler_agreement']:.1f}% of them (ties half)"
    )


def _add_rlhf(sub, parents) -> None:
    p = sub.add_parser(
        "rlhf",
        parents=parents,
        help="optimise an SFT model against a reward model with PPO",
        description="RLHF with PPO: per-token KL penalty to the SFT model, GAE, clipped "
        "surrogate and value losses. Writes a run directory.",
    )
    add_config_arguments(p, RLHFConfig)
    add_config_file(p)
    p.set_defaults(handler=_run_rlhf, stage="rlhf", config_class=RLHFConfig)


def _run_rlhf(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.alignment.rlhf import rlhf

    run = Path(rlhf(_config(RLHFConfig, args), command=command))
    _policy_summary(run)


def _policy_summary(run: Path) -> None:
    """The closing lines of a stage that optimises a policy by sampling (rlhf, grpo)."""
    last = _last_row(run / "eval.csv")
    summary(
        [
            f"run directory: {run}/ (hf/ the policy, iterNNNN/ the evaluated ones, metrics.csv)",
            "held-out " + _metric_line(last, ("proxy", "gold", "kl"), "iteration", "eval.csv"),
            report_line(run),
            f"next: selfsup lm chat {shlex.quote(str(run))}",
        ]
    )


def _add_best_of_n(sub, parents) -> None:
    p = sub.add_parser(
        "best-of-n",
        parents=parents,
        help="the training-free baseline: the reward model's favourite of n samples",
    )
    p.add_argument("--policy", required=True, help="the SFT run to sample from")
    p.add_argument("--reward", required=True, help="the reward-model run")
    p.add_argument("--prompts", required=True, help="JSONL of held-out prompts")
    p.add_argument("--n", default="1,2,4,8,16,32,64", help="comma list of n")
    p.add_argument("--gold", default="none", help="none | arithmetic")
    p.add_argument("--limit", type=int, default=128, help="prompts used")
    p.add_argument(
        "--pool", type=int, default=0, help="answers sampled per prompt (default: the largest n)"
    )
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument(
        "--no-end-score",
        type=float,
        default=-1.0,
        help="the score of an answer that never emits the end token (default: -1, as lm rlhf)",
    )
    p.add_argument("--truncate", action="store_true", help=TRUNCATE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        help="a folder to keep the table in (best_of_n.json, config.yaml) with its report.html",
    )
    p.set_defaults(handler=_run_best_of_n)


def _run_best_of_n(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.alignment.rlhf import best_of_n

    try:
        ns = sorted({int(n) for n in args.n.split(",") if n.strip()})
    except ValueError:
        raise SelfsupError(f"--n {args.n!r}: expected a comma list of integers") from None
    if not ns or ns[0] < 1:
        raise SelfsupError(f"--n {args.n!r}: every n must be at least 1")
    if args.out and Path(args.out).is_file():  # told before any sampling
        raise SelfsupError(f"--out {args.out} is a file; expected a folder")
    rows = best_of_n(
        args.policy, args.reward, args.prompts, ns, args.gold, args.max_new_tokens,
        args.limit, args.seed, args.pool, args.no_end_score, args.truncate,
    )  # fmt: skip
    print(f"{'n':>4} {'KL bound':>9} {'proxy':>7}" + (f" {'gold':>6}" if "gold" in rows[0] else ""))
    for r in rows:
        gold = f" {r['gold']:6.3f}" if "gold" in r else ""
        print(f"{r['n']:4d} {r['kl_bound']:9.3f} {r['proxy']:7.3f}{gold}")
    if args.out:
        _keep_best_of_n(Path(args.out), rows, args, command)


def _keep_best_of_n(out: Path, rows: list[dict], args: argparse.Namespace, command: str) -> None:
    """OUT/best_of_n.json, config.yaml and command.txt, then OUT/report.html (its curve)."""
    import json

    import yaml

    from selfsup.core import run as rundir

    options = {k: v for k, v in vars(args).items() if k not in ("handler", "out", "lm_command")}
    options = {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))}
    config = {"stage": "best-of-n", **options}
    with rundir.run_locked(out):  # one writer per run folder
        out.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_text(out / "best_of_n.json", json.dumps(rows, indent=2) + "\n")
        rundir.atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        rundir.write_command(out, command, append=False)
    summary([f"table: {out / 'best_of_n.json'}", report_line(out)])


def _add_chat(sub, parents) -> None:
    p = sub.add_parser("chat", parents=parents, help="talk to an SFT or RLHF model in the terminal")
    p.add_argument("run", help="an SFT or RLHF run (or a local HF folder with chat markers)")
    p.add_argument("--system", help="a system message to start with")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="longest reply in tokens (default: 64, or half the model's context when shorter)",
    )
    p.set_defaults(handler=_run_chat)


def _run_chat(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.alignment.rlhf import chat_reply, load_policy
    from selfsup.lm.data.context import (
        check_new_tokens,
        context_length,
        default_new_tokens,
        shorten,
    )

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SelfsupError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise SelfsupError(f"--temperature must be at least 0, got {args.temperature}")
    tokenizer, model = load_policy(args.run)
    context = context_length(model)
    if args.max_new_tokens is None:
        args.max_new_tokens = default_new_tokens(context)
    check_new_tokens(args.max_new_tokens, context)
    room = None if context is None else context - args.max_new_tokens
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("(an empty line or Ctrl-D ends the conversation)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        try:
            kept = messages if room is None else shorten(tokenizer, messages, room, False)
            if len(kept) < len(messages):  # as `lm generate` keeps the end of a long prompt
                print(
                    f"(the conversation outgrew the model's context of {context} tokens: its "
                    f"{len(messages) - len(kept)} oldest messages are left out)"
                )
            reply = chat_reply(model, tokenizer, kept, args.max_new_tokens, args.temperature)
            messages[:] = kept
        except SelfsupError as e:  # e.g. characters the tokenizer lacks: say so, keep talking
            print(f"selfsup: {e}")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply or " "})
        print(f"assistant> {reply}")


def _add_icl(sub, parents) -> None:
    p = sub.add_parser(
        "icl",
        parents=parents,
        help="in-context learning: few-shot prompting, linear regression in context",
    )
    kinds = p.add_subparsers(dest="icl_task", required=True, metavar="TASK")
    f = kinds.add_parser("few-shot", parents=parents, help="accuracy against k demonstrations")
    f.add_argument("run", help="a pretrained model (run directory or local HF folder)")
    f.add_argument("--data", required=True, help="JSONL of prompt/completion pairs")
    f.add_argument("--shots", default="0,1,2,4,8", help="comma list of k")
    f.add_argument(
        "--limit", type=int, default=100, help="pairs asked, the file's last ones (default: 100)"
    )
    add_deprecated(f, "--questions", "limit", "--limit", type=int)
    f.add_argument("--max-new-tokens", type=int, default=24)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(handler=_run_few_shot)
    r = kinds.add_parser(
        "regression",
        parents=parents,
        help="train a transformer on (x1, y1, ..., xk, yk, xq) and compare it with least squares",
    )
    r.add_argument("--dims", type=int, default=5, help="dimension d of x (default: 5)")
    r.add_argument("--points", type=int, default=20, help="examples per sequence (default: 20)")
    r.add_argument("--steps", type=int, default=2000)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--width", type=int, default=64)
    r.add_argument("--layers", type=int, default=3)
    r.add_argument("--heads", type=int, default=4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", default="icl-regression.png", help="plot of error against k")
    r.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress bar (default: on a terminal)",
    )
    r.set_defaults(handler=_run_regression)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SelfsupError(f"{option} {text!r}: expected a comma list of integers") from None
    if not values or values[0] < 0:
        raise SelfsupError(f"{option} {text!r}: expected non-negative integers")
    return values


def _run_few_shot(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.evaluation.icl import few_shot

    accuracy = few_shot(
        args.run, args.data, _ints(args.shots, "--shots"), args.limit, args.max_new_tokens,
        args.seed,
    )  # fmt: skip
    print(f"{'k':>3}  accuracy ({args.limit} questions, exact match)")
    for k, acc in accuracy.items():
        print(f"{k:3d}  {100 * acc:5.1f}%")


def _progress(flag: bool | None) -> bool:
    import sys

    return flag if flag is not None else sys.stderr.isatty()


def _run_regression(args: argparse.Namespace, command: str) -> None:
    from pathlib import Path

    from selfsup.lm.evaluation.icl import evaluate_regression, plot_regression, train_regression

    model = train_regression(
        args.dims, args.points, args.steps, args.batch_size, args.lr, args.width, args.layers,
        args.heads, args.seed, progress=_progress(args.progress),
    )  # fmt: skip
    result = evaluate_regression(model, args.dims, args.points)
    names = list(result.errors)
    print("squared error / d of the prediction for the query after k examples (0 guesses 1.0)")
    print(f"{'k':>3} " + " ".join(f"{n:>13}" for n in names))
    for k in result.ks:
        print(f"{k:3d} " + " ".join(f"{result.errors[n][k]:13.3f}" for n in names))
    plot_regression(result, Path(args.output))
    k = min(2 * args.dims, result.ks[-1])  # past d examples least squares is exact
    summary(
        [
            f"plot: {args.output} (error against k, the transformer beside its baselines)",
            f"at k = {k}: transformer {result.errors['transformer'][k]:.3f}, least squares "
            f"{result.errors['least squares'][k]:.3f}, 3-NN {result.errors['3-NN'][k]:.3f}",
            "next: longer training brings the transformer toward least squares: selfsup lm icl "
            f"regression --dims {args.dims} --points {args.points} --steps {2 * args.steps}",
        ]
    )


ALIGN_COMMANDS = [
    _add_icl,
    _add_arithmetic,
    _add_sft,
    _add_label,
    _add_reward,
    _add_rlhf,
    _add_best_of_n,
    _add_chat,
]


def _add_dpo(sub, parents) -> None:
    from selfsup.lm.options import DPOConfig

    p = sub.add_parser(
        "dpo",
        parents=parents,
        help="direct preference optimisation of an SFT model on ranked or chosen/rejected pairs",
        description="DPO (Rafailov et al., 2023): the SFT model learns from preference pairs "
        "directly, no reward model and no sampling; the SFT model itself is the frozen "
        "reference. Writes a run directory (training counted in --epochs).",
    )
    add_config_arguments(p, DPOConfig, skip=("pack",))
    add_config_file(p)
    p.set_defaults(handler=_run_dpo, stage="dpo", config_class=DPOConfig)


def _run_dpo(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.alignment.dpo import dpo
    from selfsup.lm.options import DPOConfig

    run = Path(dpo(_config(DPOConfig, args), command=command))
    summary(
        [
            f"run directory: {run}/ (hf/ the policy, metrics.csv, checkpoint)",
            _metric_line(_last_row(run / "metrics.csv"), ("val_reward_acc", "val_loss")),
            report_line(run),
            f"next: selfsup lm chat {shlex.quote(str(run))}",
        ]
    )


ALIGN_COMMANDS += [_add_dpo]


def _add_grpo(sub, parents) -> None:
    from selfsup.lm.options import GRPOConfig

    p = sub.add_parser(
        "grpo",
        parents=parents,
        help="optimise an SFT model with GRPO: group-relative advantages, no value model",
        description="GRPO (Shao et al., 2024): G answers per prompt, rewards standardised within "
        "each group, clipped ratio, k3 KL to the SFT model in the loss. Writes a run directory.",
    )
    add_config_arguments(p, GRPOConfig)
    add_config_file(p)
    p.set_defaults(handler=_run_grpo, stage="grpo", config_class=GRPOConfig)


def _run_grpo(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.alignment.grpo import grpo
    from selfsup.lm.options import GRPOConfig

    run = Path(grpo(_config(GRPOConfig, args), command=command))
    _policy_summary(run)


ALIGN_COMMANDS += [_add_grpo]
