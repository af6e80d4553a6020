"""The `selfsup` command: a thin mirror of the Python API (same option names and defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from selfsup.cli import option_files
from selfsup.core import __version__
from selfsup.core.config import (
    add_dataclass_arguments,
    add_option,
    check_fields,
    field_types,
    from_namespace,
    option,
    read_config_file,
    read_yaml,
    seed_type,
    type_of,
)
from selfsup.core.errors import SelfsupError, one_line
from selfsup.image.config import EvalConfig, PretrainConfig
from selfsup.image.methods import METHODS


class UsageError(Exception):
    """A command line argparse rejects; `main` prints it as one line with a --help hint."""


class Parser(argparse.ArgumentParser):
    """argparse without the 40-line usage dump on errors, and without abbreviated options
    (`--fraction` must not silently mean `--fractions`). Sub-parsers inherit the class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def output_file(path: str | None) -> Path | None:
    """Check early (before any work) that a file can be written at `path`; creates its folder."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise SelfsupError(f"{out} is a folder; give a file name to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SelfsupError(f"{out}: cannot create its folder {out.parent} ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise SelfsupError(f"{out}: its folder {out.parent} is not writable")
    return out


def command_path(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[list[str], argparse.ArgumentParser, str | None]:
    """(the command words of `argv`, the sub-parser they lead to, the first word after them)."""
    words, current = [], parser
    for word in (a for a in argv if not a.startswith("-")):
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return words, current, word
        words.append(word)
        current = sub.choices[word]
    return words, current, None


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The sub-parser of the command `argv` names (`selfsup lm pretrain gpt` -> gpt's)."""
    return command_path(parser, argv)[1]


def help_hint(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """`selfsup pretrain simclr --help`: the command words of `argv` that the parser knows (a
    positional with choices, such as pretrain's METHOD, counts when valid)."""
    words, current, after = command_path(parser, argv)
    chooser = next((a for a in current._actions if a.choices and not a.option_strings), None)
    if after is not None and chooser is not None and after in chooser.choices:
        words.append(after)
    return " ".join(["selfsup", *words, "--help"])


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The `selfsup` parser (building it imports no torch); `method` adds that method's own
    options to `pretrain` (read from its file, not imported)."""

    parser = Parser(
        prog="selfsup",
        description="Self-supervised representation learning: pretrain on unlabeled images, "
        "then evaluate with few labels.",
    )
    common = Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    max_pixels_help = (
        "largest image decoded, width × height (default 89,478,485, PIL's limit); "
        "larger files are refused before they are decoded"
    )
    for q in (parser, common):
        q.add_argument(
            "--max-pixels",
            type=positive_int,
            metavar="N",
            default=argparse.SUPPRESS,
            help=max_pixels_help,
        )
    parser.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign]

    p = sub.add_parser(
        "pretrain",
        help="pretrain an encoder with a self-supervised method",
        description="Pretrain an encoder; writes a run directory. `selfsup pretrain --resume RUN` "
        "continues RUN (its method and options) from its last checkpoint.",
    )
    p.add_argument(
        "method",
        nargs="?",
        choices=sorted(METHODS),
        help="self-supervised method (required unless --resume)",
    )
    add_dataclass_arguments(p, PretrainConfig)
    option_types = {**field_types(PretrainConfig), "method": str}  # a file may name METHOD
    if method is not None:
        own = p.add_argument_group(f"{method}'s own options")
        for spec in METHODS.options(method):
            tp = type_of(spec.type)
            add_option(own, spec.name, tp, spec.default, spec.help, suppress=True)
            option_types[spec.name] = tp
    # An older run's config.yaml records every method's options: the others' are skipped.
    p.set_defaults(
        option_types=option_types, ignored_options=METHODS.all_option_names() - set(option_types)
    )

    e = sub.add_parser(
        "evaluate",
        help="linear probe, kNN, k-means and the few-label table",
        description="Evaluate a run's encoder; results go to RUN/eval/<data>/.",
    )
    e.add_argument("run", help="run directory written by `selfsup pretrain`")
    add_dataclass_arguments(e, EvalConfig)
    e.set_defaults(option_types=field_types(EvalConfig), ignored_options=set())
    for q in (p, e):
        q.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="options from a YAML file (a run's own config.yaml repeats that run); "
            "flags given here override it",
        )

    m = sub.add_parser("embed", help="write a dataset's embeddings to a .npy file")
    m.add_argument("run", help="run directory")
    m.add_argument("--data", help="dataset spec (default: the run's own)")
    m.add_argument("--split", default="train", choices=["train", "test"])
    m.add_argument("--data-dir", help="root of torchvision datasets")
    m.add_argument("--download", action="store_true", help="download a missing dataset")
    m.add_argument(
        "--limit", type=positive_int, help="stratified first N samples (of either split)"
    )
    m.add_argument("--batch-size", type=positive_int, default=256)
    m.add_argument("--device", default="auto")
    m.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .npy (labels, when present, go to OUTPUT with .labels.npy)",
    )

    d = sub.add_parser(
        "demo",
        help="pretrain SimCLR on the built-in digits and print the "
        "few-label table (offline, a few minutes on a laptop CPU)",
    )
    d.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    d.add_argument("--epochs", type=int, default=None, help="pretraining epochs")

    z = sub.add_parser(
        "zero-shot",
        help="classify images with a clip run from class names and prompt templates",
        description="Zero-shot top-1/top-5 accuracy; results go to RUN/eval/<data>/zero_shot.json.",
    )
    z.add_argument("run", help="run directory of `selfsup pretrain clip`")
    z.add_argument("--data", help="labeled dataset spec (default: the run's own)")
    z.add_argument(
        "--classes",
        help="class names in label order: a file (one per line) or a comma list "
        "(default: the dataset's)",
    )
    z.add_argument(
        "--templates",
        help="prompt templates, each with {} for the class name: a file (one per line) or a "
        "'|'-separated list (default: the run's)",
    )
    r = sub.add_parser(
        "retrieve",
        help="search a clip run's held-out images by text, or measure recall@k",
        description="With a query: print (and with -o draw) the best-matching images. Without: "
        "image→text and text→image recall@1/5/10 and median rank, next to chance.",
    )
    r.add_argument("run", help="run directory of `selfsup pretrain clip`")
    r.add_argument("query", nargs="?", help="a caption to search for (omit for the metrics)")
    r.add_argument("--data", help="image–caption spec (default: the run's own)")
    r.add_argument("--top", type=positive_int, default=5, help="images to show (default: 5)")
    r.add_argument("-o", "--output", help="save the best images as a picture (PNG)")
    for q in (z, r):
        q.add_argument("--split", default="test", choices=["train", "test"])
        q.add_argument("--data-dir", help="root of torchvision datasets")
        q.add_argument("--device", default="auto")
    z.add_argument("--download", action="store_true", help="download a missing dataset")
    z.add_argument("--limit", type=positive_int, help="stratified first N images")
    z.add_argument("--batch-size", type=positive_int, default=256)

    s = sub.add_parser(
        "samples",
        help="redraw a run's sample grid from a checkpoint",
        description="Rebuild the run's method from config.yaml, load a checkpoint and redraw its "
        "sample grid on the images training drew.",
    )
    s.add_argument("run", help="run directory written by `selfsup pretrain`")
    s.add_argument(
        "--checkpoint", default="last", help="last | best | a checkpoint file (default: last)"
    )
    s.add_argument(
        "-o", "--output", help="output PNG (default RUN/samples/regenerated/epochNNN.png)"
    )
    s.add_argument(
        "--beside",
        nargs="+",
        default=[],
        metavar="RUN",
        help="inpainting: other runs (e.g. --adv 0) drawn as extra rows on the same images",
    )

    c = sub.add_parser(
        "select",
        help="choose which images to label, from a run's embeddings (no labels used)",
        description="Write RUN/select/STRATEGY-N.csv (rank, index, path) and a contact sheet "
        "of the picks. typiclust: the most typical image of each of N clusters (best with few "
        "labels); kcenter: a greedy coreset that covers the embeddings; random: the baseline.",
    )
    c.add_argument("run", help="run directory written by `selfsup pretrain`")
    c.add_argument("--budget", type=positive_int, required=True, help="images to label (required)")
    c.add_argument(
        "--strategy",
        default="typiclust",
        choices=["typiclust", "kcenter", "random"],
        help="(default: typiclust)",
    )
    c.add_argument("--data", help="images to choose from (default: the run's training images)")
    c.add_argument("--seed", type=seed_type, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("-o", "--output", help="output CSV (the contact sheet goes beside it)")

    k = sub.add_parser(
        "classify",
        help="train a classifier from a few labels: the run's frozen encoder and a linear head",
        description="Labels: a CSV with the header path,label (image files) or index,label "
        "(positions in the run's training images), or folder:PATH with class sub-folders. "
        "Writes one file (encoder, feature statistics, head; classes in its metadata).",
    )
    k.add_argument("run", help="run directory written by `selfsup pretrain`")
    k.add_argument("--labels", required=True, help="labels CSV or folder:PATH (required)")
    k.add_argument("--out", required=True, help="the classifier file to write (required)")
    k.add_argument("--data", help="the images `index` rows count in (default: the run's)")
    k.add_argument(
        "--finetune",
        action="store_true",
        help="train the encoder too, from the linear head's solution (slower; how long is "
        "chosen on 20%% of the labels held out)",
    )
    k.add_argument("--seed", type=seed_type, default=0)
    k.add_argument("--device", default="auto")

    v = sub.add_parser(
        "predict",
        help="label images (a folder or one file) with a classifier from `selfsup classify`",
        description="Streams the images in batches; writes path, label, confidence, one "
        "probability per class and low_confidence (1 below --threshold).",
    )
    v.add_argument("classifier", help="file written by `selfsup classify`")
    v.add_argument(
        "images", help="an image file, or a folder (PATH or folder:PATH) searched recursively"
    )
    v.add_argument("-o", "--output", required=True, help="predictions CSV (required)")
    v.add_argument("--threshold", type=float, default=0.5, help="(default: 0.5)")
    v.add_argument("--batch-size", type=positive_int, default=256)
    v.add_argument("--device", default="auto")

    n = sub.add_parser(
        "index",
        help="embed images (a folder or one file) for similarity search (`selfsup similar`)",
        description="Streams the images in batches; writes the unit-norm embeddings, the paths "
        "and the run into one .npz.",
    )
    n.add_argument("run", help="run directory written by `selfsup pretrain`")
    n.add_argument(
        "images", help="an image file, or a folder (PATH or folder:PATH) searched recursively"
    )
    n.add_argument("-o", "--output", required=True, help="the index file to write (required)")
    n.add_argument(
        "--approximate",
        action="store_true",
        help="also write a FAISS index (OUTPUT.faiss) for fast search in large collections; "
        "needs faiss: pip install 'selfsup[search]'",
    )
    n.add_argument("--batch-size", type=positive_int, default=256)
    n.add_argument("--device", default="auto")

    q = sub.add_parser(
        "similar",
        help="the images of an index most similar to an image (cosine similarity)",
        description="Prints rank, similarity and path; with -o also a picture of the query and "
        "its neighbours (PNG) and the same list as CSV beside it. Searches through INDEX.faiss "
        "when `selfsup index --approximate` wrote one, else exactly.",
    )
    q.add_argument("index", help="file written by `selfsup index`")
    q.add_argument("image", help="the query image file")
    q.add_argument("-k", type=positive_int, default=8, help="neighbours (default: 8)")
    q.add_argument("-o", "--output", help="picture of the neighbours (PNG; CSV beside it)")

    x = sub.add_parser(
        "export",
        help="write a run's encoder for use without selfsup (ONNX, TorchScript, safetensors)",
        description="Images float [0, 1] N×C×H×W at the run's size -> features N×D; the "
        "normalisation is inside. Default output: RUN/export/encoder.{onnx,pt,safetensors}.",
    )
    x.add_argument("run", help="run directory written by `selfsup pretrain`")
    x.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "torchscript", "safetensors"],
        help="(default: onnx)",
    )
    x.add_argument("-o", "--output", help="output file")

    a = sub.add_parser("augment-preview", help="draw every augmentation of one image")
    a.add_argument("image", help="an image file (PNG, JPEG, ...)")
    a.add_argument("-o", "--output", default="augmentations.png", help="output PNG")
    a.add_argument("--size", type=positive_int, default=224, help="side of each panel in pixels")
    a.add_argument("--seed", type=seed_type, default=0)

    w = sub.add_parser(
        "report",
        help="one self-contained HTML page of one or several runs, side by side",
        description="Curves, few-label results, embedding map, nearest neighbours, samples and "
        "configuration of each run (image or language); pictures inside the file, no network. "
        "What a run folder lacks is listed on the page.",
    )
    w.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    w.add_argument("-o", "--output", help="the page to write (default: RUN/report.html of one run)")
    w.add_argument(
        "--no-embeddings",
        action="store_true",
        help="skip the sections that run the encoder (map, neighbours, augmentations)",
    )

    from selfsup.cli.lm.main import add_lm_parser  # `selfsup lm ...`: language models (torch-free)

    add_lm_parser(sub, parents=[common])
    option_files.add_everywhere(parser)  # --config FILE.yaml on every other command
    return parser


def run_command(args: argparse.Namespace, argv: list[str]) -> None:
    if args.command == "pretrain":
        if args.method is None and not args.resume:
            raise UsageError("a METHOD is required (or --resume RUN)")
        given = {
            k: v for k, v in vars(args).items() if k in METHODS.option_names(args.method or "")
        }
        config = from_namespace(PretrainConfig, args, method=args.method, options=given)
        check_method_options(args.method, given)
        from selfsup.api import pretrain  # torch and Lightning: only once the options pass

        run = pretrain(config, command=shlex.join(["selfsup", *argv]))
        from selfsup.core.run import is_first_process
        from selfsup.image.train import run_summary

        if is_first_process():
            print(run_summary(run))
    elif args.command == "evaluate":
        config = from_namespace(EvalConfig, args)
        from selfsup.api import evaluate

        results = evaluate(args.run, config)
        print_results(results)
    elif args.command == "embed":
        _embed(args)
    elif args.command == "demo":
        from selfsup.cli.demo import demo

        demo(out=args.out, epochs=args.epochs)
    elif args.command == "zero-shot":
        _zero_shot(args)
    elif args.command == "retrieve":
        _retrieve(args)
    elif args.command == "samples":
        from selfsup.image.use.samples import regenerate_samples

        output_file(args.output)
        print(
            regenerate_samples(
                args.run, checkpoint=args.checkpoint, out=args.output, beside=args.beside
            )
        )
    elif args.command == "select":
        from selfsup.image.use.select import select

        output_file(args.output)
        r = select(
            args.run,
            args.budget,
            strategy=args.strategy,
            data=args.data,
            seed=args.seed,
            out=args.output,
            device=args.device,
        )
        print(f"{len(r['indices'])} images to label ({r['strategy']}): {r['csv']}")
        print(f"contact sheet: {r['sheet']}")
    elif args.command == "classify":
        from selfsup.image.use.classify import classify

        output_file(args.out)
        r = classify(
            args.run,
            args.labels,
            args.out,
            data=args.data,
            device=args.device,
            finetune=args.finetune,
            seed=args.seed,
        )
        if r["finetune"]:
            f = r["finetune"]
            print(
                f"fine-tuned {f['rounds']} rounds (best on {f['held_out']} held-out labels; "
                "0: the linear head alone was best)"
            )
        print(
            f"{r['out']}: {len(r['classes'])} classes from {r['labels']} labels (C {r['C']:g}, "
            f"training accuracy {100 * r['train_accuracy']:.1f}%)\n"
            f"next: selfsup predict {r['out']} folder:IMAGES -o predictions.csv"
        )
    elif args.command == "predict":
        from selfsup.image.use.classify import predict

        output_file(args.output)
        r = predict(
            args.classifier,
            args.images,
            args.output,
            batch_size=args.batch_size,
            threshold=args.threshold,
            device=args.device,
        )
        print(f"{r['out']}: {r['images']} images labelled, {r['low_confidence']} flagged")
    elif args.command == "index":
        from selfsup.image.use import ann
        from selfsup.image.use.search import build_index

        output_file(args.output)
        r = build_index(
            args.run,
            args.images,
            args.output,
            batch_size=args.batch_size,
            device=args.device,
            approximate=args.approximate,
        )
        print(f"{r['out']}: {r['images']} images, {r['dim']}-d embeddings")
        if "approximate" in r:
            a = r["approximate"]
            print(
                f"FAISS index beside it: {a['lists']} lists, {a['nprobe']} searched per query "
                f"(recall@10 {a['sample_recall']:.3f} on a sample, against exact search)"
            )
            if note := ann.structure_note(a):
                print(note)
        print(f"next: selfsup similar {r['out']} IMAGE -k 8 -o neighbours.png")
    elif args.command == "similar":
        from selfsup.image.use.search import similar

        output_file(args.output)
        r = similar(args.index, args.image, k=args.k, out=args.output)
        for hit in r["hits"]:
            print(f"{hit['rank']:3d}. {hit['similarity']:.3f}  {hit['path']}")
        print(f"({r['search']} search)")
        if r["picture"]:
            print(f"picture: {r['picture']} (list: {Path(r['picture']).with_suffix('.csv')})")
    elif args.command == "export":
        from selfsup.image.use.export import export

        output_file(args.output)
        path = export(args.run, args.format, args.output)
        print(f"{path}: the encoder as {args.format} (images [0, 1] N×C×H×W -> features N×D)")
    elif args.command == "augment-preview":
        from selfsup.image.augment.preview import augment_preview

        output_file(args.output)
        print(augment_preview(args.image, args.output, size=args.size, seed=args.seed))
    elif args.command == "report":
        from selfsup.reporting import report

        output_file(args.output)
        print(report(args.runs, args.output, embeddings=not args.no_embeddings))
    elif args.command == "lm":
        from selfsup.cli.lm.main import run_lm

        run_lm(args, argv)


def check_method_options(method: str | None, given: dict[str, object]) -> None:
    """Check a method's own options against the ranges its file declares (`check=`), read from
    the file as `--help` reads them: a bad value is refused before torch is imported."""
    specs = [s for s in METHODS.options(method or "") if s.name in given]
    fields = [(s.name, type_of(s.type), option(s.default, s.help, **s.metadata)) for s in specs]
    check_fields(dataclasses.make_dataclass("Options", fields)(**given))


def print_results(results: dict) -> None:
    print(f"\n{results['data']}: {results['train_size']} train / {results['test_size']} test")
    print(f"linear probe (all labels): {100 * results['linear_probe']:.1f}%")
    print(f"kNN (all labels):          {100 * results['knn']:.1f}%")
    if "kmeans" in results:
        km = results["kmeans"]
        print(f"k-means:                   NMI {km['nmi']:.3f}, accuracy {100 * km['acc']:.1f}%")
    print(
        f"\nfew-label accuracy (%) of a {results['probe']} probe on frozen features, mean ± std "
        "over label subsets:\n" + results["table"]
    )
    if any(row["method"] == "supervised" for row in results["few_label"]):
        print(f"({results['supervised_rule']})")
    if "shift" in results:
        from selfsup.image.evaluation.shift import format_shift_table

        print(
            "\naccuracy (%) under distribution shift (probe trained on clean labels; severities "
            "1/2/3):\n" + format_shift_table(results["shift"], tuple(results["shift_corruptions"]))
        )
    print(f"\nresults and plots: {results['out']}")
    if results.get("report"):
        print(f"report: {results['report']}")


def _embed(args: argparse.Namespace) -> None:
    import numpy as np

    from selfsup.image.runs import embed

    out = output_file(args.output)
    features, labels = embed(
        args.run,
        args.data,
        split=args.split,
        data_dir=args.data_dir,
        download=args.download,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
    )
    np.save(out, features)
    print(f"{out}: {features.shape[0]} × {features.shape[1]} float32")
    if labels is not None:
        labels_path = out.with_suffix(".labels.npy")
        np.save(labels_path, labels)
        print(f"{labels_path}: labels")


def _zero_shot(args: argparse.Namespace) -> None:
    from selfsup.image.evaluation.zero_shot import zero_shot_evaluation

    r = zero_shot_evaluation(
        args.run,
        args.data,
        classes=args.classes,
        templates=args.templates,
        split=args.split,
        data_dir=args.data_dir,
        download=args.download,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(
        f"{r['data']} ({r['split']}, {r['images']} images, {len(r['classes'])} classes × "
        f"{len(r['templates'])} templates): zero-shot top-1 {r['top1']:.1f}%"
        + (f", top-5 {r['top5']:.1f}%" if "top5" in r else "")
        + f" (chance {r['chance_top1']:.1f}%)\nresults: {r['out']}"
    )


def _retrieve(args: argparse.Namespace) -> None:
    from selfsup.image.evaluation.retrieval import format_retrieval, retrieval_evaluation, retrieve

    output_file(args.output)
    if args.query is None:
        r = retrieval_evaluation(
            args.run, args.data, split=args.split, data_dir=args.data_dir, device=args.device
        )
        print(f"{r['data']} ({r['split']}): {r['images']} images, {r['captions']} captions")
        print(format_retrieval(r["metrics"], r["chance"]))
        print(f"results: {r['out']}")
        return
    hits = retrieve(
        args.run,
        args.query,
        args.data,
        top=args.top,
        split=args.split,
        data_dir=args.data_dir,
        output=args.output,
        device=args.device,
    )
    for hit in hits:
        print(f"{hit['rank']:3d}. {hit['score']:.3f}  {hit['name']}  ({hit['caption']})")
    if args.output:
        print(f"picture: {args.output}")


def pretrain_method(argv: list[str]) -> str | None:
    """The method a `selfsup pretrain` command line trains: named, or from the file of
    `--config FILE` or the run of `--resume RUN` (None if none can be told: errors come later)."""

    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] != "pretrain":
        return None
    named = next((a for a in argv[argv.index("pretrain") + 1 :] if a in METHODS), None)
    if named is not None:
        return named
    for flag, name in (("--config", None), ("--resume", "config.yaml")):
        if flag in argv[:-1]:
            path = Path(argv[argv.index(flag) + 1])
            try:
                method = read_yaml(path / name if name else path).get("method")
            except (SelfsupError, AttributeError):  # the command reports it in one line later
                continue
            if method in METHODS:
                return method
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(method=pretrain_method(argv))
    try:
        args = parser.parse_args(option_files.expand(parser, argv))  # --config's options first
        if getattr(args, "config", None):  # the file's values become defaults; flags win
            values = read_config_file(args.config, args.option_types, args.ignored_options)
            command_parser(parser, argv).set_defaults(**values)
            args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(f"{e}; see `{help_hint(parser, argv)}`")
    except SelfsupError as e:
        return _fail(str(e))
    debug = args.debug or bool(os.environ.get("SELFSUP_DEBUG"))
    if getattr(args, "max_pixels", None) is not None:
        # read by selfsup.image.data.decode.max_pixels(); the environment reaches worker processes
        os.environ["SELFSUP_MAX_PIXELS"] = str(args.max_pixels)
    try:
        run_command(args, argv)
    except UsageError as e:
        return _fail(f"{e}; see `{help_hint(parser, argv)}`")
    except SelfsupError as e:
        if debug:
            traceback.print_exc()
        return _fail(one_line(e))
    except OSError as e:
        if e.filename is None or debug:  # not about a file the user named: a bug, show it
            raise
        return _fail(f"{e.filename}: {e.strerror or e}")
    except KeyboardInterrupt as e:
        note = f"; {e}" if str(e) else ""
        print(f"selfsup: interrupted{note}", file=sys.stderr)
        return 130
    return 0


def _fail(message: str) -> int:
    """Print one error line (newlines inside a message are folded) and return exit code 2."""
    print(f"selfsup: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
