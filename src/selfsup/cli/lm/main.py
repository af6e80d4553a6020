"""The `selfsup lm ...` command group: language-model pretraining, tokenizers, generation.

How to add to it:
- a model kind for `selfsup lm pretrain KIND`: its file and one line in
  `selfsup.lm.methods.PRETRAIN`. Its flags are LMConfig's (`selfsup.lm.options`) and its own
  `Options`, its help, defaults and presets literals on its class, all read from the source, so
  that help and usage errors stay instant. The command calls `pretrain_lm` (see
  `selfsup.lm.training.pretrain`) with LMConfig and the kind's Options; a kind naming an
  `entry` (word2vec) is run by that function of its file with its Options alone.
- a command `selfsup lm NAME`: write `_add_NAME(sub, parents)`, which adds the subparser with
  `parents=parents` and `set_defaults(handler=...)`, where the handler takes
  `(args, command: str)`; then append `_add_NAME` to COMMANDS. Import heavy modules inside the
  handler (options from `selfsup.lm.options`), so that `selfsup lm ... --help` stays instant.
- every training command ends with `common.summary(...)`: the run directory, the headline
  metric, the next command.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

from selfsup.cli.lm.align import ALIGN_COMMANDS
from selfsup.cli.lm.common import (
    QUIET,
    add_command,
    add_config_arguments,
    add_config_file,
    add_deprecated,
    check_required,
    report_line,
    stage_file_values,
    summary,
)
from selfsup.cli.lm.export import EXPORT_COMMANDS
from selfsup.cli.lm.words import WORD_COMMANDS
from selfsup.core.config import add_option, field_types, from_namespace, type_of


def _add_pretrain(sub, parents: list[argparse.ArgumentParser]) -> None:
    """`selfsup lm pretrain KIND` for every kind of the PRETRAIN registry: its help, defaults
    and presets from its class, its flags from LMConfig (unless it has its own `entry`) and its
    Options (all read from its source: no torch)."""
    from selfsup.lm.methods import PRETRAIN
    from selfsup.lm.options import LMConfig

    p = sub.add_parser(
        "pretrain",
        parents=parents,
        help="pretrain a language model on a text corpus",
        description="Pretrain a language model; writes a run directory. Language models count "
        "training in --steps (word2vec in --epochs).",
    )
    kinds = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name in PRETRAIN:
        about = PRETRAIN.about(name)
        defaults, presets = about.get("defaults", {}), about.get("presets", {})
        k = kinds.add_parser(name, parents=parents, help=about["help"], description=about["help"])
        if "entry" not in about:
            add_config_arguments(k, LMConfig, defaults)
        for spec in PRETRAIN.options(name):  # in the order its Options declare them
            add_option(k, spec.name, type_of(spec.type), spec.default, spec.help)
        add_deprecated(k, "--corpus", "data", "--data")
        if presets:
            k.add_argument(
                "--preset",
                choices=sorted(presets),
                help="named settings (benchmarks/gpt_shakespeare.py's recipes); flags given "
                "here override them",
            )
        add_config_file(k)
        k.set_defaults(**defaults, handler=_run_pretrain)


def with_preset_and_file(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """`args` parsed again with the --preset's settings, then the --config file's, as defaults
    (flags given win over both)."""
    from selfsup.lm.methods import PRETRAIN

    values: dict[str, Any] = {}
    if getattr(args, "preset", None):
        values.update(PRETRAIN.about(args.model)["presets"][args.preset])
    if getattr(args, "config_file", None):
        values.update(_file_values(args.config_file, args.model))
    return _parse_again(args, argv, values)


def _parse_again(
    args: argparse.Namespace, argv: list[str], values: dict[str, Any]
) -> argparse.Namespace:
    """`argv` parsed again with `values` as the command's defaults (no-op without values)."""
    from selfsup.cli.common import build_parser, command_parser

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


def _option_types(model: str) -> dict[str, type]:
    """`lm pretrain MODEL`'s options and their types: LMConfig's (unless the kind has its own
    `entry`), then the kind's Options', as its source declares them."""
    from selfsup.lm.methods import PRETRAIN
    from selfsup.lm.options import LMConfig

    shared = {} if "entry" in PRETRAIN.about(model) else field_types(LMConfig)
    return {**shared, **{s.name: type_of(s.type) for s in PRETRAIN.options(model)}}


def _file_values(path: str, model: str) -> dict[str, Any]:
    """The options in a YAML file for `lm pretrain MODEL`; a run's own config.yaml (its kind's
    options nested under `options`) is accepted as it is, less its run folder."""
    from selfsup.core.config import read_config_file, typed_value
    from selfsup.core.errors import SelfsupError

    types = _option_types(model)
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
    """Every kind of PRETRAIN: its options checked against their declared ranges before torch
    is imported, then `pretrain_lm` (or the kind's own `entry`), the report, the closing lines."""
    from selfsup.lm.methods import PRETRAIN
    from selfsup.lm.options import LMConfig, check_ranges

    name, about = args.model, PRETRAIN.about(args.model)
    own = {s.name: getattr(args, s.name) for s in PRETRAIN.options(name) if hasattr(args, s.name)}
    config: Any = None
    if "entry" not in about:
        config = from_namespace(LMConfig, args, model=name)
        if not config.resume:
            check_ranges(config)
    if config is None or not config.resume:
        PRETRAIN.check(name, own)  # a usage mistake is told before torch is imported
    kind = PRETRAIN.load(name)
    options = kind.Options(**own)
    if config is None:  # a loop of its own: its Options are its whole configuration
        entry = getattr(import_module(kind.__module__), about["entry"])
        run = Path(entry(options, command=command))
    else:
        from selfsup.lm.training.pretrain import pretrain_lm

        run = Path(pretrain_lm(config, options, command=command))
    _showcase(name, run, config or options)
    *written, after = _pretrain_summary(name, run)
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
    """show how a run's tokenizer splits a text

    Print the tokens of TEXT with their ids, and the token and character counts."""
    t = add_command(sub, parents, "tokenize", _add_tokenize, _run_tokenize)
    t.add_argument("run", help="run directory (or any folder holding a tokenizer.json)")
    t.add_argument("text", help="the text to tokenize")


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
    """continue a prompt with a GPT run

    Sample a continuation of --prompt from a GPT run (its hf/ export)."""
    g = add_command(sub, parents, "generate", _add_generate, _run_generate)
    g.add_argument("run", help="run directory of `selfsup lm pretrain gpt`")
    g.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default: 200)")
    g.add_argument(
        "--temperature", type=float, default=0.8, help="0 is greedy decoding (default: 0.8)"
    )
    g.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest")
    g.add_argument("--num-samples", type=int, default=1, help="independent continuations")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


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
COMMANDS += EXPORT_COMMANDS  # export (a run's model; --merge: LoRA merged)


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
