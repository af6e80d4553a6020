"""`selfsup lm` commands for the stages after pretraining (added to the group's COMMANDS in
`selfsup.cli.lm.main`): every stage of the ALIGN registry (sft, reward, rlhf, best-of-n, dpo,
grpo, ...), its parser generated from its Options and run through one dispatch (`_run_stage`),
plus the helpers around them: the arithmetic task, labeling, chat and in-context learning."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from selfsup.cli.lm.common import (
    add_command,
    add_config_file,
    add_deprecated,
    add_stage_arguments,
    deprecation,
    summary,
)
from selfsup.core.errors import SelfsupError
from selfsup.core.run import is_first_process
from selfsup.lm.alignment import ALIGN
from selfsup.lm.options import TRUNCATE_HELP


def _add_stages(sub, parents) -> None:
    """`selfsup lm NAME` for every stage NAME of the ALIGN registry: its help from the stage's
    class, its flags from its Options (both read from its source: no torch)."""
    for name in ALIGN:
        about, specs = ALIGN.about(name), ALIGN.options(name)
        p = sub.add_parser(
            name, parents=parents, help=about["help"], description=about.get("description")
        )
        file_flags = about.get("options_file") == "flags"
        add_stage_arguments(p, specs, file_flags)
        if file_flags:  # `--config` is `cli.option_files`' (its options become flags)
            p.set_defaults(handler=_run_stage, stage=name)
        else:
            add_config_file(p)
            p.set_defaults(handler=_run_stage, stage=name, config_class=specs)


def _run_stage(args: argparse.Namespace, command: str) -> None:
    """Every registered stage: its Options from the flags, its `run`, its closing lines."""
    from selfsup.api import run_stage

    stage = ALIGN.load(args.stage)
    names = {f.name for f in dataclasses.fields(stage.Options)}
    options = stage.Options(**{k: v for k, v in vars(args).items() if k in names})
    for spec in ALIGN.options(args.stage):  # `--resume` bare: the older spelling
        const = spec.metadata.get("const")
        if const is not None and getattr(options, spec.name) is const:
            flag = "--" + spec.name.replace("_", "-")
            deprecation(f"{flag} without RUN", f"{flag} RUN")
    run, page = run_stage(args.stage, options, command=command)  # as `selfsup.align` runs it
    if run is not None and is_first_process():  # torchrun/SLURM: every process gets here
        before, after = stage.summary(Path(run))
        summary([*before, f"report: {page}" if page else "", *after])


def _add_arithmetic(sub, parents) -> None:
    """write the offline RLHF task's files (corpus, demonstrations, prompts)

    Write corpus.txt, sft.jsonl, label.jsonl, rl.jsonl and eval.jsonl of the addition task whose
    gold score stands in for human preferences."""
    p = add_command(sub, parents, "arithmetic", _add_arithmetic, _run_arithmetic)
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


def _run_arithmetic(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.data.arithmetic import write_task

    for name, count in write_task(
        args.folder, args.seed, args.sft, args.num_prompts, args.max_operand
    ).items():
        print(f"{args.folder}/{name}: {count} {'lines' if name.endswith('txt') else 'records'}")


def _add_label(sub, parents) -> None:
    """sample K answers per prompt and rank them with simulated labelers"""
    p = add_command(sub, parents, "label", _add_label, _run_label)
    p.add_argument("policy", help="the model whose answers are ranked (an SFT run)")
    p.add_argument("--prompts", required=True, help="JSONL of prompts")
    p.add_argument("-o", "--output", required=True, help="rankings JSONL to write")
    p.add_argument(
        "--k", type=int, default=4, check="[2,26]", help="answers per prompt (default: 4)"
    )
    p.add_argument("--gold", default="arithmetic", help="the gold score labelers rank by")
    p.add_argument(
        "--noise", type=float, default=0.2, check=">=0", help="labelers' noise (std of the score)"
    )
    p.add_argument("--max-new-tokens", type=int, default=24, check=">=1")
    p.add_argument("--truncate", action="store_true", help=TRUNCATE_HELP)
    p.add_argument("--seed", type=int, default=0)


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


def _add_chat(sub, parents) -> None:
    """talk to an SFT or RLHF model in the terminal"""
    p = add_command(sub, parents, "chat", _add_chat, _run_chat)
    p.add_argument(
        "run",
        help="an SFT or RLHF run, or a Hugging Face chat model (a local folder or a Hub name) "
        "with a chat template of its own",
    )
    p.add_argument("--system", help="a system message to start with")
    p.add_argument(
        "--temperature", type=float, default=0.0, check=">=0", help="0 = greedy (default)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        check=">=1",
        help="longest reply in tokens (default: 64, or half the model's context when shorter)",
    )


def _run_chat(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.alignment.rlhf import chat_reply, load_policy
    from selfsup.lm.data.context import (
        check_new_tokens,
        context_length,
        default_new_tokens,
        shorten,
    )

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
    _add_label,
    _add_stages,  # sft, reward, rlhf, best-of-n, dpo, grpo, ...
    _add_chat,
]
