"""`selfsup lm neighbors` (word2vec) and `selfsup lm fill-mask` (BERT); see selfsup.cli.lm.main."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from selfsup.cli.lm.common import add_command


def _add_neighbors(sub, parents: list[argparse.ArgumentParser]) -> None:
    """nearest words of a word2vec run (cosine), or an analogy a - b + c

    Print the words whose vectors are closest (cosine) to WORD's, or with --analogy A B C to A -
    B + C (king man woman -> queen)."""
    n = add_command(sub, parents, "neighbors", _add_neighbors, _run_neighbors)
    n.add_argument("run", help="run directory of `selfsup lm pretrain word2vec`")
    n.add_argument("word", nargs="?", help="the word (not needed with --analogy)")
    n.add_argument("--analogy", nargs=3, metavar=("A", "B", "C"), help="query A - B + C")
    n.add_argument(
        "-k", "--top-k", type=int, default=10, check=">=1", help="words to show (default: 10)"
    )


def _run_neighbors(args: argparse.Namespace, command: str) -> None:
    from selfsup.core.errors import SelfsupError
    from selfsup.lm.models.word2vec import WordVectors

    if (args.word is None) == (args.analogy is None):
        raise SelfsupError("give either WORD or --analogy A B C")
    vectors = WordVectors(args.run)
    if args.analogy:
        a, b, c = args.analogy
        print(f"{a} - {b} + {c}:")
        found = vectors.analogy(a, b, c, args.top_k)
    else:
        found = vectors.neighbors(args.word, args.top_k)
    width = max(len(w) for w, _ in found)
    for word, similarity in found:
        print(f"{word:<{width}}  {similarity:.3f}")


def _add_fill_mask(sub, parents: list[argparse.ArgumentParser]) -> None:
    """top candidates for each [MASK] of a text, from a BERT run

    Print the likeliest tokens for each [MASK] in TEXT (e.g. "The man went to the [MASK] .")
    with their probabilities, from the run's hf/ export."""
    f = add_command(sub, parents, "fill-mask", _add_fill_mask, _run_fill_mask)
    f.add_argument("run", help="run directory of `selfsup lm pretrain bert` (or an HF folder)")
    f.add_argument("text", help="text with one or more [MASK] tokens")
    f.add_argument("-k", "--top-k", type=int, default=5, help="candidates (default: 5)")


def _run_fill_mask(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.models.bert import fill_mask

    for number, candidates in enumerate(fill_mask(args.run, args.text, args.top_k), start=1):
        print(f"[MASK] {number}:")
        for token, probability in candidates:
            print(f"  {token!r:<16} {probability:.3f}")


WORD_COMMANDS: list[Callable] = [_add_neighbors, _add_fill_mask]
