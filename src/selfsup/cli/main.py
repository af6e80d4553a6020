"""The `selfsup` command: a thin mirror of the Python API (same option names and defaults).

Every command is one row of COMMANDS: its name, the `_add_` function that fills its parser
(its docstring gives the command's help and description; torch-free, so that `--help` stays
instant) and the `_run_` handler that runs it (heavy imports inside). What the commands share
(the parser class, the shared options, the one-line errors) is in `selfsup.cli.common`, below
them; `selfsup lm ...` is `selfsup.cli.lm`'s.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfsup.cli import option_files
from selfsup.cli.common import (
    Parser,
    UsageError,
    about,
    add_options,
    command_parser,
    fail,
    help_hint,
    output_file,
    positive_int,
    print_results,
    provide_parser,
)
from selfsup.cli.lm.main import add_lm_parser, run_lm
from selfsup.core import __version__
from selfsup.core.config import (
    add_dataclass_arguments,
    add_option,
    field_types,
    from_namespace,
    read_config_file,
    read_yaml,
    type_of,
)
from selfsup.core.errors import SelfsupError, one_line
from selfsup.image.config import EvalConfig, PretrainConfig
from selfsup.image.methods import METHODS

MAX_PIXELS_HELP = (
    "largest image decoded, width × height (default 89,478,485, PIL's limit); "
    "larger files are refused before they are decoded"
)
CONFIG_HELP = (
    "options from a YAML file (a run's own config.yaml repeats that run); flags given here "
    "override it"
)


def keywords(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options `names` of `args`, as keyword arguments of the API function they mirror."""
    return {name: getattr(args, name) for name in names}


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        metavar="N",
        default=argparse.SUPPRESS,
        help=MAX_PIXELS_HELP,
    )


def _shared_flags() -> Parser:
    """The flags every command takes after its name too (`selfsup pretrain ... --debug`)."""
    common = Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    _add_max_pixels(common)
    return common


def _add_pretrain(p: Parser) -> None:
    """pretrain an encoder with a self-supervised method

    Pretrain an encoder; writes a run directory. `selfsup pretrain --resume RUN` continues RUN (its
    method and options) from its last checkpoint."""
    p.add_argument(
        "method",
        nargs="?",
        choices=sorted(METHODS),
        help="self-supervised method (required unless --resume)",
    )
    add_dataclass_arguments(p, PretrainConfig)
    # the options a --config file may give (METHOD too); `_add_method_options` adds the method's
    p.set_defaults(option_types={**field_types(PretrainConfig), "method": str})


def _add_method_options(p: argparse.ArgumentParser, method: str | None) -> None:
    """`method`'s own options on `pretrain` (read from its file, not imported). An older run's
    config.yaml records every method's options: the others' are skipped."""
    option_types = p.get_default("option_types")
    if method is not None:
        own = p.add_argument_group(f"{method}'s own options")
        for spec in METHODS.options(method):
            tp = type_of(spec.type)
            add_option(own, spec.name, tp, spec.default, spec.help, suppress=True)
            option_types[spec.name] = tp
    p.set_defaults(ignored_options=METHODS.all_option_names() - set(option_types))


def _run_pretrain(args: argparse.Namespace, argv: list[str]) -> None:
    if args.method is None and not args.resume:
        raise UsageError("a METHOD is required (or --resume RUN)")
    given = {k: v for k, v in vars(args).items() if k in METHODS.option_names(args.method or "")}
    config = from_namespace(PretrainConfig, args, method=args.method, options=given)
    check_method_options(args.method, given)
    from selfsup.api import pretrain  # torch and Lightning: only once the options pass

    run = pretrain(config, command=shlex.join(["selfsup", *argv]))
    from selfsup.core.run import is_first_process
    from selfsup.image.train import run_summary

    if is_first_process():
        print(run_summary(run))


def check_method_options(method: str | None, given: dict[str, object]) -> None:
    """Check a method's own options against the ranges its file declares (`check=`), read from
    the file as `--help` reads them: a bad value is refused before torch is imported."""
    METHODS.check(method or "", given)


def _add_evaluate(e: Parser) -> None:
    """linear probe, kNN, k-means and the few-label table

    Evaluate a run's encoder; results go to RUN/eval/<data>/."""
    add_options(e, run=True)
    add_dataclass_arguments(e, EvalConfig)
    e.set_defaults(option_types=field_types(EvalConfig), ignored_options=set())


def _run_evaluate(args: argparse.Namespace, argv: list[str]) -> None:
    config = from_namespace(EvalConfig, args)
    from selfsup.api import evaluate

    print_results(evaluate(args.run, config))


def _add_embed(m: Parser) -> None:
    """write a dataset's embeddings to a .npy file"""
    add_options(
        m,
        run="run directory",
        data="dataset spec (default: the run's own)",
        split={"default": "train"},
        data_dir=True,
        download=True,
        limit="stratified first N samples (of either split)",
        batch_size=True,
        device=True,
        output={
            "required": True,
            "help": "output .npy (labels, when present, go to OUTPUT with .labels.npy)",
        },
    )


def _run_embed(args: argparse.Namespace, argv: list[str]) -> None:
    import numpy as np

    from selfsup.image.runs import embed

    out = output_file(args.output)
    features, labels = embed(
        args.run,
        args.data,
        **keywords(args, "split", "data_dir", "download", "limit", "batch_size", "device"),
    )
    np.save(out, features)
    print(f"{out}: {features.shape[0]} × {features.shape[1]} float32")
    if labels is not None:
        labels_path = out.with_suffix(".labels.npy")
        np.save(labels_path, labels)
        print(f"{labels_path}: labels")


def _add_demo(d: Parser) -> None:
    """pretrain SimCLR on the built-in digits and print the few-label table (offline, a few minutes
    on a laptop CPU)"""
    add_options(d, out={"default": "runs/demo", "help": "run directory (default: runs/demo)"})
    d.add_argument("--epochs", type=int, default=None, help="pretraining epochs")


def _run_demo(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.cli.demo import demo

    demo(out=args.out, epochs=args.epochs)


CLIP_RUN_HELP = "run directory of `selfsup pretrain clip`"


def _add_zero_shot(z: Parser) -> None:
    """classify images with a clip run from class names and prompt templates

    Zero-shot top-1/top-5 accuracy; results go to RUN/eval/<data>/zero_shot.json."""
    add_options(z, run=CLIP_RUN_HELP, data="labeled dataset spec (default: the run's own)")
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
    add_options(
        z,
        split=True,
        data_dir=True,
        device=True,
        download=True,
        limit="stratified first N images",
        batch_size=True,
    )


def _run_zero_shot(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.evaluation.zero_shot import zero_shot_evaluation

    names = ("classes", "templates", "split", "data_dir", "download", "limit", "batch_size")
    r = zero_shot_evaluation(args.run, args.data, **keywords(args, *names, "device"))
    print(
        f"{r['data']} ({r['split']}, {r['images']} images, {len(r['classes'])} classes × "
        f"{len(r['templates'])} templates): zero-shot top-1 {r['top1']:.1f}%"
        + (f", top-5 {r['top5']:.1f}%" if "top5" in r else "")
        + f" (chance {r['chance_top1']:.1f}%)\nresults: {r['out']}"
    )


def _add_retrieve(r: Parser) -> None:
    """search a clip run's held-out images by text, or measure recall@k

    With a query: print (and with -o draw) the best-matching images. Without: image→text and
    text→image recall@1/5/10 and median rank, next to chance."""
    add_options(r, run=CLIP_RUN_HELP)
    r.add_argument("query", nargs="?", help="a caption to search for (omit for the metrics)")
    add_options(r, data="image–caption spec (default: the run's own)")
    r.add_argument("--top", type=positive_int, default=5, help="images to show (default: 5)")
    add_options(
        r,
        output="save the best images as a picture (PNG)",
        split=True,
        data_dir=True,
        device=True,
    )


def _run_retrieve(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.evaluation.retrieval import format_retrieval, retrieval_evaluation, retrieve

    output_file(args.output)
    where = keywords(args, "split", "data_dir", "device")
    if args.query is None:
        r = retrieval_evaluation(args.run, args.data, **where)
        print(f"{r['data']} ({r['split']}): {r['images']} images, {r['captions']} captions")
        print(format_retrieval(r["metrics"], r["chance"]))
        print(f"results: {r['out']}")
        return
    hits = retrieve(args.run, args.query, args.data, top=args.top, output=args.output, **where)
    for hit in hits:
        print(f"{hit['rank']:3d}. {hit['score']:.3f}  {hit['name']}  ({hit['caption']})")
    if args.output:
        print(f"picture: {args.output}")


def _add_samples(s: Parser) -> None:
    """redraw a run's sample grid from a checkpoint

    Rebuild the run's method from config.yaml, load a checkpoint and redraw its sample grid on the
    images training drew."""
    add_options(s, run=True)
    s.add_argument(
        "--checkpoint", default="last", help="last | best | a checkpoint file (default: last)"
    )
    add_options(s, output="output PNG (default RUN/samples/regenerated/epochNNN.png)")
    s.add_argument(
        "--beside",
        nargs="+",
        default=[],
        metavar="RUN",
        help="inpainting: other runs (e.g. --adv 0) drawn as extra rows on the same images",
    )


def _run_samples(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.use.samples import regenerate_samples

    output_file(args.output)
    r = regenerate_samples(args.run, out=args.output, **keywords(args, "checkpoint", "beside"))
    print(r)


def _add_select(c: Parser) -> None:
    """choose which images to label, from a run's embeddings (no labels used)

    Write RUN/select/STRATEGY-N.csv (rank, index, path) and a contact sheet of the picks. typiclust:
    the most typical image of each of N clusters (best with few labels); kcenter: a greedy coreset
    that covers the embeddings; random: the baseline."""
    add_options(c, run=True)
    c.add_argument("--budget", type=positive_int, required=True, help="images to label (required)")
    c.add_argument(
        "--strategy",
        default="typiclust",
        choices=["typiclust", "kcenter", "random"],
        help="(default: typiclust)",
    )
    add_options(
        c,
        data="images to choose from (default: the run's training images)",
        seed=True,
        device=True,
        output="output CSV (the contact sheet goes beside it)",
    )


def _run_select(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.use.select import select

    output_file(args.output)
    names = ("strategy", "data", "seed", "device")
    r = select(args.run, args.budget, out=args.output, **keywords(args, *names))
    print(f"{len(r['indices'])} images to label ({r['strategy']}): {r['csv']}")
    print(f"contact sheet: {r['sheet']}")


def _add_classify(k: Parser) -> None:
    """train a classifier from a few labels: the run's frozen encoder and a linear head

    Labels: a CSV with the header path,label (image files) or index,label (positions in the run's
    training images), or folder:PATH with class sub-folders. Writes one file (encoder, feature
    statistics, head; classes in its metadata)."""
    add_options(k, run=True)
    k.add_argument("--labels", required=True, help="labels CSV or folder:PATH (required)")
    add_options(
        k,
        out={"required": True, "help": "the classifier file to write (required)"},
        data="the images `index` rows count in (default: the run's)",
    )
    k.add_argument(
        "--finetune",
        action="store_true",
        help="train the encoder too, from the linear head's solution (slower; how long is "
        "chosen on 20%% of the labels held out)",
    )
    add_options(k, seed=True, device=True)


def _run_classify(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.use.classify import classify

    output_file(args.out)
    names = ("data", "device", "finetune", "seed")
    r = classify(args.run, args.labels, args.out, **keywords(args, *names))
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


def _add_predict(v: Parser) -> None:
    """label images (a folder or one file) with a classifier from `selfsup classify`

    Streams the images in batches; writes path, label, confidence, one probability per class and
    low_confidence (1 below --threshold)."""
    v.add_argument("classifier", help="file written by `selfsup classify`")
    add_options(v, images=True, output={"required": True, "help": "predictions CSV (required)"})
    v.add_argument("--threshold", type=float, default=0.5, help="(default: 0.5)")
    add_options(v, batch_size=True, device=True)


def _run_predict(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.use.classify import predict

    output_file(args.output)
    names = ("batch_size", "threshold", "device")
    r = predict(args.classifier, args.images, args.output, **keywords(args, *names))
    print(f"{r['out']}: {r['images']} images labelled, {r['low_confidence']} flagged")


def _add_index(n: Parser) -> None:
    """embed images (a folder or one file) for similarity search (`selfsup similar`)

    Streams the images in batches; writes the unit-norm embeddings, the paths and the run into one
    .npz."""
    add_options(
        n,
        run=True,
        images=True,
        output={"required": True, "help": "the index file to write (required)"},
    )
    n.add_argument(
        "--approximate",
        action="store_true",
        help="also write a FAISS index (OUTPUT.faiss) for fast search in large collections; "
        "needs faiss: pip install 'selfsup[search]'",
    )
    add_options(n, batch_size=True, device=True)


def _run_index(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.use import ann
    from selfsup.image.use.search import build_index

    output_file(args.output)
    names = ("batch_size", "device", "approximate")
    r = build_index(args.run, args.images, args.output, **keywords(args, *names))
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


def _add_similar(q: Parser) -> None:
    """the images of an index most similar to an image (cosine similarity)

    Prints rank, similarity and path; with -o also a picture of the query and its neighbours (PNG)
    and the same list as CSV beside it. Searches through INDEX.faiss when `selfsup index
    --approximate` wrote one, else exactly."""
    q.add_argument("index", help="file written by `selfsup index`")
    q.add_argument("image", help="the query image file")
    q.add_argument("-k", type=positive_int, default=8, help="neighbours (default: 8)")
    add_options(q, output="picture of the neighbours (PNG; CSV beside it)")


def _run_similar(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.use.search import similar

    output_file(args.output)
    r = similar(args.index, args.image, k=args.k, out=args.output)
    for hit in r["hits"]:
        print(f"{hit['rank']:3d}. {hit['similarity']:.3f}  {hit['path']}")
    print(f"({r['search']} search)")
    if r["picture"]:
        print(f"picture: {r['picture']} (list: {Path(r['picture']).with_suffix('.csv')})")


def _add_export(x: Parser) -> None:
    """write a run's encoder for use without selfsup (ONNX, TorchScript, safetensors)

    Images float [0, 1] N×C×H×W at the run's size -> features N×D; the normalisation is inside.
    Default output: RUN/export/encoder.{onnx,pt,safetensors}."""
    add_options(x, run=True)
    x.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "torchscript", "safetensors"],
        help="(default: onnx)",
    )
    add_options(x, output="output file")


def _run_export(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.use.export import export

    output_file(args.output)
    path = export(args.run, args.format, args.output)
    print(f"{path}: the encoder as {args.format} (images [0, 1] N×C×H×W -> features N×D)")


def _add_augment_preview(a: Parser) -> None:
    """draw every augmentation of one image"""
    a.add_argument("image", help="an image file (PNG, JPEG, ...)")
    add_options(a, output={"default": "augmentations.png", "help": "output PNG"})
    a.add_argument("--size", type=positive_int, default=224, help="side of each panel in pixels")
    add_options(a, seed=True)


def _run_augment_preview(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.augment.preview import augment_preview

    output_file(args.output)
    print(augment_preview(args.image, args.output, size=args.size, seed=args.seed))


def _add_report(w: Parser) -> None:
    """one self-contained HTML page of one or several runs, side by side

    Curves, few-label results, embedding map, nearest neighbours, samples and configuration of each
    run (image or language); pictures inside the file, no network. What a run folder lacks is listed
    on the page."""
    w.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    add_options(w, output="the page to write (default: RUN/report.html of one run)")
    w.add_argument(
        "--no-embeddings",
        action="store_true",
        help="skip the sections that run the encoder (map, neighbours, augmentations)",
    )


def _run_report(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.reporting import report

    output_file(args.output)
    print(report(args.runs, args.output, embeddings=not args.no_embeddings))


def _add_shard(h: Parser) -> None:
    """write a dataset as shards, to stream with --data litdata:DIR or --data wds:DIR

    DIR/train/ and DIR/test/ (litdata's optimised chunks, or with --format wds WebDataset tar
    shards: each image's file bytes as they are, JPEG/PNG/TIFF, plus its label; arrays as PNG
    or .npy) and DIR/selfsup.json (classes, labels). Copy a litdata DIR to object storage to
    stream it from there (--data litdata:s3://BUCKET/DIR); wds: reads local tars."""
    h.add_argument("data", metavar="DATA", help="a --data spec (folder:PATH, npz:FILE, ...)")
    add_options(h, out={"required": True, "help": "output folder (new or empty)"})
    add_options(h, data_dir=True, download=True, limit="stratified first N training images")
    h.add_argument(
        "--format",
        choices=("litdata", "wds"),
        default="litdata",
        help="litdata (pip install litdata) or wds: WebDataset tars (pip install webdataset)",
    )
    h.add_argument("--chunk-bytes", help="litdata: the size of each chunk (default: 64MB)")
    h.add_argument(
        "--shard-size", type=positive_int, help="wds: images per tar shard (default: 1000)"
    )
    h.add_argument("--num-workers", type=positive_int, default=1, help="litdata: writing processes")


def _run_shard(args: argparse.Namespace, argv: list[str]) -> None:
    from selfsup.image.data.sources import load_splits

    wds = args.format == "wds"
    wrong = ("--chunk-bytes", args.chunk_bytes) if wds else ("--shard-size", args.shard_size)
    if wrong[1] is not None:
        other = "litdata" if wds else "wds"
        raise SelfsupError(f"{wrong[0]} applies to --format {other} only")
    train, test = load_splits(
        args.data, stream=True, **keywords(args, "data_dir", "download", "limit")
    )
    if wds:
        from selfsup.image.data.wds import SHARD_SIZE, write_wds

        written = write_wds(train, test, args.out, shard_size=args.shard_size or SHARD_SIZE)
    else:
        from selfsup.image.data.shards import write_shards

        chunk = args.chunk_bytes or "64MB"
        written = write_shards(
            train, test, args.out, chunk_bytes=chunk, num_workers=args.num_workers
        )
    counts = ", ".join(f"{k} {v} images" for k, v in written.items())
    print(f"{args.out}: {counts}; use --data {args.format}:{args.out}")


Handler = Callable[[argparse.Namespace, list[str]], None]

# name -> (fills the command's parser, whose help and description are its docstring; runs the
# parsed command line). `lm` is a group of commands that selfsup.cli.lm.main adds whole.
COMMANDS: dict[str, tuple[Callable[..., None], Handler]] = {
    "pretrain": (_add_pretrain, _run_pretrain),
    "evaluate": (_add_evaluate, _run_evaluate),
    "embed": (_add_embed, _run_embed),
    "demo": (_add_demo, _run_demo),
    "zero-shot": (_add_zero_shot, _run_zero_shot),
    "retrieve": (_add_retrieve, _run_retrieve),
    "samples": (_add_samples, _run_samples),
    "select": (_add_select, _run_select),
    "classify": (_add_classify, _run_classify),
    "predict": (_add_predict, _run_predict),
    "index": (_add_index, _run_index),
    "similar": (_add_similar, _run_similar),
    "export": (_add_export, _run_export),
    "augment-preview": (_add_augment_preview, _run_augment_preview),
    "report": (_add_report, _run_report),
    "shard": (_add_shard, _run_shard),
    "lm": (add_lm_parser, run_lm),
}


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The `selfsup` parser (building it imports no torch); `method` adds that method's own
    options to `pretrain` (read from its file, not imported)."""
    parser = Parser(
        prog="selfsup",
        description="Self-supervised representation learning: pretrain on unlabeled images, "
        "then evaluate with few labels.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    _add_max_pixels(parser)
    parser.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = [_shared_flags()]  # taken after a command's name too
    sub.add_parser = functools.partial(sub.add_parser, parents=shared)  # type: ignore[method-assign]
    for name, (add, _) in COMMANDS.items():
        if add is add_lm_parser:  # it adds `lm` and the commands below it
            add_lm_parser(sub, parents=shared)
        else:
            add(sub.add_parser(name, **about(add)))
    _add_method_options(sub.choices["pretrain"], method)
    for name in ("pretrain", "evaluate"):  # read against their dataclasses (read_config_file)
        sub.choices[name].add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    option_files.add_everywhere(parser)  # --config FILE.yaml on every other command
    return parser


provide_parser(build_parser)  # for `selfsup lm`, which parses its line again (cli.common)


def run_command(args: argparse.Namespace, argv: list[str]) -> None:
    """Run the parsed command line `args` (of `argv`) through its COMMANDS handler."""
    COMMANDS[args.command][1](args, argv)


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
        return fail(f"{e}; see `{help_hint(parser, argv)}`")
    except SelfsupError as e:
        return fail(str(e))
    debug = args.debug or bool(os.environ.get("SELFSUP_DEBUG"))
    if getattr(args, "max_pixels", None) is not None:
        # read by selfsup.image.data.decode.max_pixels(); the environment reaches worker processes
        os.environ["SELFSUP_MAX_PIXELS"] = str(args.max_pixels)
    try:
        run_command(args, argv)
    except UsageError as e:
        return fail(f"{e}; see `{help_hint(parser, argv)}`")
    except SelfsupError as e:
        if debug:
            traceback.print_exc()
        return fail(one_line(e))
    except OSError as e:
        if e.filename is None or debug:  # not about a file the user named: a bug, show it
            raise
        return fail(f"{e.filename}: {e.strerror or e}")
    except KeyboardInterrupt as e:
        note = f"; {e}" if str(e) else ""
        print(f"selfsup: interrupted{note}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
