"""The `selfsup lm ...` command group: language-model pretraining, tokenizers, generation.

How to add to it:
- a model kind for `selfsup lm pretrain KIND`: list its module in `selfsup.lm.MODELS` and its
  options in `selfsup.lm.options.KINDS` (the dataclasses to mirror as flags, torch-free, so that
  help and usage errors stay instant; the module imports them from there). By default the
  command calls `pretrain_lm` (see `selfsup.lm.training.pretrain`) with LMConfig and the kind's
  Options; a kind with its own entry defines `run_pretrain(*configs, command=...)` returning the run
  directory.
- a command `selfsup lm NAME`: write `_add_NAME(sub, parents)`, which adds the subparser with
  `parents=parents` and `set_defaults(handler=...)`, where the handler takes
  `(args, command: str)`; then append `_add_NAME` to COMMANDS. Import heavy modules inside the
  handler (options from `selfsup.lm.options`), so that `selfsup lm ... --help` stays instant.
- every training command ends with `common.summary(...)`: the run directory, the headline
  metric, the next command.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfsup.cli.lm.align import ALIGN_COMMANDS
from selfsup.cli.lm.common import (
    QUIET,
    add_config_arguments,
    add_config_file,
    add_deprecated,
    check_required,
    report_line,
    stage_file_values,
    summary,
)
from selfsup.cli.lm.words import WORD_COMMANDS
from selfsup.core.config import field_types


def _add_pretrain(sub, parents: list[argparse.ArgumentParser]) -> None:
    from selfsup.lm.options import KINDS

    p = sub.add_parser(
        "pretrain",
        parents=parents,
        help="pretrain a language model on a text corpus",
        description="Pretrain a language model; writes a run directory. Language models count "
        "training in --steps (word2vec in --epochs).",
    )
    kinds = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, kind in KINDS.items():
        k = kinds.add_parser(name, parents=parents, help=kind.help, description=kind.help)
        for config_class in kind.configs:
            add_config_arguments(k, config_class, kind.defaults)
        add_deprecated(k, "--corpus", "data", "--data")
        if kind.presets:
            k.add_argument(
                "--preset",
                choices=sorted(kind.presets),
                help="named settings (benchmarks/gpt_shakespeare.py's recipes); flags given "
                "here override them",
            )
        add_config_file(k)
        k.set_defaults(**kind.defaults, handler=_run_pretrain)


def with_preset_and_file(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """`args` parsed again with the --preset's settings, then the --config file's, as defaults
    (flags given win over both)."""
    from selfsup.lm.options import KINDS

    values: dict[str, Any] = {}
    if getattr(args, "preset", None):
        values.update(KINDS[args.model].presets[args.preset])
    if getattr(args, "config_file", None):
        values.update(_file_values(args.config_file, args.model))
    return _parse_again(args, argv, values)


def _parse_again(
    args: argparse.Namespace, argv: list[str], values: dict[str, Any]
) -> argparse.Namespace:
    """`argv` parsed again with `values` as the command's defaults (no-op without values)."""
    from selfsup.cli.main import build_parser, command_parser

    if not values:
        return args
    parser = build_parser()
    command_parser(parser, argv).set_defaults(**values)
    QUIET["notes"] = True  # the first parse printed them
    try:
        return parser.parse_args(argv)
    finally:
        QUIET["notes"] = False


RUN_ONLY = ("out", "resume", "tokenizer_size", "vocabulary")  # what a run adds to its options


def _file_values(path: str, model: str) -> dict[str, Any]:
    """The options in a YAML file for `lm pretrain MODEL`; a run's own config.yaml (its kind's
    options nested under `options`) is accepted as it is, less its run folder."""
    from selfsup.core.config import read_config_file, typed_value
    from selfsup.core.errors import SelfsupError
    from selfsup.lm.options import KINDS

    types: dict[str, type] = {}
    for config_class in KINDS[model].configs:
        types.update(field_types(config_class))
    extra = {"options": dict, "model": str, "corpus": str, **dict.fromkeys(RUN_ONLY, str)}
    extra |= {"tokenizer_size": int, "vocabulary": int}
    values = read_config_file(path, {**extra, **types})
    if values.get("model", model) != model:
        raise SelfsupError(
            f"--config {path}: options of a {values['model']} run; use "
            f"`selfsup lm pretrain {values['model']}`"
        )
    for key, value in (values.pop("options", None) or {}).items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise SelfsupError(f"--config {path}: {key!r} is not an option of {model}")
        values[name] = typed_value(value, types[name], f"--config {path}: {key}")
    if "corpus" in values:  # runs from before `data` was named so
        values.setdefault("data", values.pop("corpus"))
    return {k: v for k, v in values.items() if k in types}


def _run_pretrain(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm import MODELS
    from selfsup.lm.options import KINDS, LMConfig, check_ranges

    configs = []
    for config_class in KINDS[args.model].configs:
        names = {f.name for f in dataclasses.fields(config_class)}
        values = {k: v for k, v in vars(args).items() if k in names}
        if "model" in names:
            values["model"] = args.model
        configs.append(config_class(**values))
    if isinstance(configs[0], LMConfig) and not configs[0].resume:
        check_ranges(configs[0])  # a usage mistake is told before torch is imported
    from selfsup.lm.training.pretrain import pretrain_lm

    module = importlib.import_module(MODELS[args.model])
    run = Path(getattr(module, "run_pretrain", pretrain_lm)(*configs, command=command))
    _showcase(args.model, run, configs[0])
    *written, after = _pretrain_summary(args.model, run)
    summary([*written, report_line(run), after])


def _showcase(model: str, run: Path, config: Any) -> None:
    """What the report shows of a finished run: a GPT's samples, a BERT's fill-mask guesses."""
    from selfsup.lm.evaluation import showcase

    if model == "gpt":
        showcase.write_gpt_samples(run)
    elif model == "bert":
        from selfsup.lm.data.corpus import read_texts

        showcase.write_fill_mask_examples(
            run, read_texts(config.data, config.encoding, config.text_field)
        )


def _pretrain_summary(model: str, run: Path) -> list[str]:
    results = (
        json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    )
    q = shlex.quote(str(run))
    if model == "word2vec":
        metric = (
            f"{results['words']:,} words in {results['seconds']} s "
            f"({results['words_per_s']:,} words/s; results.json)"
            if "words_per_s" in results
            else ""
        )
        written = "config.yaml, vectors.safetensors, vocab.tsv, metrics.csv"
        after = f"selfsup lm neighbors {q} WORD"
    else:
        metric = (
            f"validation loss {results['val_loss']:.4f} ({results.get('kept', 'final')} weights, "
            f"{results.get('eval_batches', '?')} batches; results.json)"
            if "val_loss" in results
            else ""
        )
        written = "config.yaml, checkpoints/, hf/, metrics.csv, results.json"
        after = (
            f"selfsup lm generate {q} --prompt 'ROMEO:'"
            if model == "gpt"
            else f"selfsup lm fill-mask {q} 'The man went to the [MASK] .'"
        )
    return [f"run directory: {run}/ ({written})", metric, f"next: {after}"]


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
    from selfsup.core.tokenizer import encode_text, load_tokenizer

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
    from selfsup.lm.models.gpt import generate_text

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
    if args.lm_command == "pretrain":
        args = with_preset_and_file(args, argv)
    elif getattr(args, "config_file", None):  # sft, reward, rlhf
        values = stage_file_values(args.config_file, args.config_class, args.stage)
        args = _parse_again(args, argv, values)
    if getattr(args, "config_class", None):
        check_required(args, args.config_class)
    args.handler(args, shlex.join(["selfsup", *argv]))
