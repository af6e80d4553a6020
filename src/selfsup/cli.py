"""The `selfsup` command: a thin mirror of the Python API (same option names and defaults)."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import traceback
from pathlib import Path

from selfsup.config import EvalConfig, PretrainConfig, add_dataclass_arguments, from_namespace
from selfsup.errors import SelfsupError


def build_parser() -> argparse.ArgumentParser:
    from selfsup.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Self-supervised representation learning: pretrain on unlabeled images, "
        "then evaluate with few labels.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign]

    p = sub.add_parser(
        "pretrain",
        help="pretrain an encoder with a self-supervised method",
        description="Pretrain an encoder; writes a run directory.",
    )
    p.add_argument("method", choices=sorted(METHODS), help="self-supervised method")
    add_dataclass_arguments(p, PretrainConfig)

    e = sub.add_parser(
        "evaluate",
        help="linear probe, kNN, k-means and the few-label table",
        description="Evaluate a run's encoder; results go to RUN/eval/<data>/.",
    )
    e.add_argument("run", help="run directory written by `selfsup pretrain`")
    add_dataclass_arguments(e, EvalConfig)

    m = sub.add_parser("embed", help="write a dataset's embeddings to a .npy file")
    m.add_argument("run", help="run directory")
    m.add_argument("--data", help="dataset spec (default: the run's own)")
    m.add_argument("--split", default="train", choices=["train", "test"])
    m.add_argument("--data-dir", help="root of torchvision datasets")
    m.add_argument("--download", action="store_true", help="download a missing dataset")
    m.add_argument("--limit", type=int, help="stratified first N samples")
    m.add_argument("--batch-size", type=int, default=256)
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

    a = sub.add_parser("augment-preview", help="draw every augmentation of one image")
    a.add_argument("image", help="an image file (PNG, JPEG, ...)")
    a.add_argument("-o", "--output", default="augmentations.png", help="output PNG")
    a.add_argument("--size", type=int, default=224, help="side of each panel in pixels")
    a.add_argument("--seed", type=int, default=0)
    return parser


def run_command(args: argparse.Namespace, argv: list[str]) -> None:
    if args.command == "pretrain":
        from selfsup.train import pretrain

        config = from_namespace(PretrainConfig, args, method=args.method)
        run = pretrain(config, command=shlex.join(["selfsup", *argv]))
        print(f"run directory: {run}")
    elif args.command == "evaluate":
        from selfsup.api import evaluate

        results = evaluate(args.run, from_namespace(EvalConfig, args))
        print_results(results)
    elif args.command == "embed":
        _embed(args)
    elif args.command == "demo":
        from selfsup.demo import demo

        demo(out=args.out, epochs=args.epochs)
    elif args.command == "augment-preview":
        from selfsup.augment.preview import augment_preview

        print(augment_preview(args.image, args.output, size=args.size, seed=args.seed))


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
        print(
            f"(supervised: the same encoder trained end to end on those labels for "
            f"{results['supervised_steps']} steps)"
        )
    print(f"\nresults and plots: {results['out']}")


def _embed(args: argparse.Namespace) -> None:
    import numpy as np

    from selfsup.api import embed

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
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, features)
    print(f"{out}: {features.shape[0]} × {features.shape[1]} float32")
    if labels is not None:
        labels_path = out.with_suffix(".labels.npy")
        np.save(labels_path, labels)
        print(f"{labels_path}: labels")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("SELFSUP_DEBUG"))
    try:
        run_command(args, argv)
    except SelfsupError as e:
        if debug:
            traceback.print_exc()
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
