"""The `selfsup lm ...` command group: language-model pretraining, tokenizers, generation.

How to add to it:
- a model kind for `selfsup lm pretrain KIND`: list its module in `selfsup.lm.MODELS`. By
  default the command mirrors `LMConfig` and the module's `Options` dataclass as flags and calls
  `pretrain_lm` (see `selfsup.lm.train`). A kind with its own entry instead defines
  `CLI_CONFIGS` (the dataclasses to mirror, in order) and `run_pretrain(*configs, command=...)`
  returning the run directory.
- a command `selfsup lm NAME`: write `_add_NAME(sub, parents)`, which adds the subparser with
  `parents=parents` and `set_defaults(handler=...)`, where the handler takes
  `(args, command: str)`; then append `_add_NAME` to COMMANDS. Import heavy modules inside the
  handler, so that `selfsup --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
from collections.abc import Callable
from pathlib import Path

from selfsup.config import add_dataclass_arguments
from selfsup.lm.cli_align import ALIGN_COMMANDS
from selfsup.lm.cli_words import WORD_COMMANDS


def _add_pretrain(sub, parents: list[argparse.ArgumentParser]) -> None:
    from selfsup.lm import MODELS

    p = sub.add_parser(
        "pretrain",
        parents=parents,
        help="pretrain a language model on a text corpus",
        description="Pretrain a language model; writes a run directory.",
    )
    kinds = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, module_name in MODELS.items():
        module = importlib.import_module(module_name)
        k = kinds.add_parser(name, parents=parents, help=(module.__doc__ or "").split("\n")[0])
        for config_class in _cli_configs(module):
            add_dataclass_arguments(k, config_class)
        k.set_defaults(**getattr(module, "DEFAULTS", {}), handler=_run_pretrain)


def _cli_configs(module) -> tuple[type, ...]:
    from selfsup.lm.train import LMConfig

    return getattr(module, "CLI_CONFIGS", (LMConfig, getattr(module, "Options", None)))


def _run_pretrain(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm import MODELS
    from selfsup.lm.train import pretrain_lm

    module = importlib.import_module(MODELS[args.model])
    configs = []
    for config_class in _cli_configs(module):
        names = {f.name for f in dataclasses.fields(config_class)}
        values = {k: v for k, v in vars(args).items() if k in names}
        if "model" in names:
            values["model"] = args.model
        configs.append(config_class(**values))
    run = getattr(module, "run_pretrain", pretrain_lm)(*configs, command=command)
    print(f"run directory: {run}")
    results = Path(run) / "results.json"
    if results.is_file():
        print(f"results: {results}")


def _add_tokenize(sub, parents: list[argparse.ArgumentParser]) -> None:
    t = sub.add_parser(
        "tokenize",
        parents=parents,
        help="show how a run's tokenizer splits a text",
        description="Print the tokens of TEXT with their ids, and the token and character counts.",
    )
    t.add_argument("run", help="run directory (or any folder holding a tokenizer.json)")
    t.add_argument("text", help="the text to tokenize")
    t.set_defaults(handler=_run_tokenize)


def _run_tokenize(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.tokenizer import encode_text, load_tokenizer

    tokenizer = load_tokenizer(args.run)
    ids = encode_text(tokenizer, args.text, "TEXT")
    pieces = [tokenizer.decode([i]) for i in ids]
    width = max((len(repr(p)) for p in pieces), default=0)
    for piece, i in zip(pieces, ids, strict=True):
        print(f"{repr(piece):<{width}}  {i}")
    print(
        f"{len(ids)} tokens, {len(args.text)} characters "
        f"({len(args.text) / max(1, len(ids)):.2f} characters per token; vocabulary "
        f"{len(tokenizer)})"
    )


def _add_generate(sub, parents: list[argparse.ArgumentParser]) -> None:
    g = sub.add_parser(
        "generate",
        parents=parents,
        help="continue a prompt with a GPT run",
        description="Sample a continuation of --prompt from a GPT run (its hf/ export).",
    )
    g.add_argument("run", help="run directory of `selfsup lm pretrain gpt`")
    g.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default: 200)")
    g.add_argument(
        "--temperature", type=float, default=0.8, help="0 is greedy decoding (default: 0.8)"
    )
    g.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest")
    g.add_argument("--num-samples", type=int, default=1, help="independent continuations")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.gpt import generate_text

    texts = generate_text(
        args.run,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    print("\n---------------\n".join(texts))


COMMANDS: list[Callable] = [_add_pretrain, _add_tokenize, _add_generate]
COMMANDS += ALIGN_COMMANDS  # sft, label, reward, rlhf, best-of-n, chat (issue 7)
COMMANDS += WORD_COMMANDS  # neighbors (word2vec), fill-mask (BERT)


def add_lm_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    """Add `lm` and its commands to the `selfsup` subparsers `sub`."""
    lm = sub.add_parser(
        "lm",
        help="language self-supervision: pretrain GPT-style models, tokenize, generate",
        description="Language models: tokenizers, pretraining and generation.",
    )
    commands = lm.add_subparsers(dest="lm_command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands, parents)


def run_lm(args: argparse.Namespace, argv: list[str]) -> None:
    args.handler(args, shlex.join(["selfsup", *argv]))
