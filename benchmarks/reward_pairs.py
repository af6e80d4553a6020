"""Where a reward model for the arithmetic task goes wrong: its held-out pair accuracy against
the gold score, split by what separates the two answers.

The held-out rankings are the last `--val-fraction` of the file, as `selfsup lm reward` splits
them. A strictly ordered pair (the labeler put one answer above the other) is one of:
- gold tie: both answers have the same gold score; the labeler's noise ordered them, so nothing
  can predict it beyond chance (often the two answers are the very same text, which any reward
  model scores alike: a tie, half a pair in `selfsup lm reward`'s accuracy);
- style only: both right or both wrong, one in the house style (gold differs by 0.5);
- sum only: both in the house style or both not, one with the right sum (gold differs by 1);
- sum and style: they differ in both.
An empty answer (gold −0.5) counts as off-style and wrong.

    python benchmarks/reward_pairs.py runs/arith-rm data/arith/rankings.jsonl
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from transformers import AutoModelForSequenceClassification

from selfsup.lm.data.chat_data import ranking_batch
from selfsup.lm.data.conversations import read_rankings
from selfsup.lm.models import hf
from selfsup.lm.training.posttrain import reward_of, split_validation


def pair_kind(gold_a: float, gold_b: float) -> str:
    if gold_a == gold_b:
        return "gold tie"
    sum_differs = (gold_a >= 1) != (gold_b >= 1)
    style_differs = (gold_a % 1 == 0.5) != (gold_b % 1 == 0.5)
    if sum_differs and style_differs:
        return "sum and style"
    return "sum only" if sum_differs else "style only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reward", help="a `selfsup lm reward` run directory")
    parser.add_argument("rankings", help="the rankings JSONL it was trained on (with gold scores)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=96)
    args = parser.parse_args()

    rankings = read_rankings(args.rankings)
    _, held_out = split_validation(rankings, args.val_fraction, "ranked prompts")
    if any(r.gold is None for r in held_out):
        raise SystemExit(f"{args.rankings}: the rankings carry no gold scores")
    tokenizer, model = hf.load_tokenizer_and(
        f"{args.reward}/hf", AutoModelForSequenceClassification, num_labels=1
    )
    model.eval()
    pairs, right, identical = Counter(), Counter(), 0
    with torch.no_grad():
        for start in range(0, len(held_out), 16):
            chunk = held_out[start : start + 16]
            batch = ranking_batch(tokenizer, chunk, args.max_length)
            rewards = reward_of(model, batch["input_ids"], batch["attention_mask"]).tolist()
            gold = [g for r in chunk for g in r.gold]  # type: ignore[union-attr]
            texts = [c for r in chunk for c in r.completions]
            for w, l in batch["pairs"].tolist():
                kind = pair_kind(gold[w], gold[l])
                pairs[kind] += 1
                identical += texts[w] == texts[l]
                if kind != "gold tie":
                    right[kind] += (rewards[w] > rewards[l]) == (gold[w] > gold[l])

    total = sum(pairs.values())
    print(
        f"{len(held_out)} held-out prompts, {total} strictly ordered pairs, "
        f"{identical / max(1, total):.1%} of them two identical answers"
    )
    print(f"{'pair kind':14s} {'share':>6s} {'reward model agrees with gold':>30s}")
    for kind in ("gold tie", "style only", "sum only", "sum and style"):
        share = pairs[kind] / max(1, total)
        agrees = "—" if kind == "gold tie" else f"{right[kind] / max(1, pairs[kind]):.1%}"
        print(f"{kind:14s} {share:6.1%} {agrees:>30s}")


if __name__ == "__main__":
    main()
