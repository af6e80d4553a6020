"""The programmatic gold preference and the simulated labelers of the RLHF pipeline."""

import json
import re

import numpy as np
import pytest

from selfsup.core.errors import SelfsupError
from selfsup.lm.data.arithmetic import (
    Problem,
    demonstration,
    gold_score,
    pretraining_text,
    problems,
    simulated_ranking,
    write_task,
)
from selfsup.lm.losses.preference import ranking_pairs


def test_problems_are_reproducible_and_varied():
    first, again = problems(50, seed=3), problems(50, seed=3)
    assert first == again
    assert len({p.prompt.split()[0] for p in first}) > 1  # several phrasings
    assert all(str(p.a) in p.prompt and str(p.b) in p.prompt for p in first)


@pytest.mark.parametrize(
    "response, score",
    [
        ("The answer is 12.", 1.5),  # right, terse
        ("12.", 1.5),
        ("The answer is 13.", 0.5),  # wrong number, house style
        ("The answer is twelve, I think, yes.", 0.0),  # no number, too long
        ("I am fairly sure it is 12 or so.", 1.0),  # right but rambling (over 20 characters)
        ("12. Or 13.", 1.0),  # two sentences
        ("   ", -0.5),
    ],
)
def test_gold_score(response, score):
    assert gold_score(Problem(5, 7, "What is 5 plus 7?"), response) == score


def test_demonstrations_get_the_top_gold_score():
    assert all(gold_score(p, demonstration(p)) == 1.5 for p in problems(100, seed=0))


def test_pretraining_text_states_true_sums():
    text = pretraining_text(200, seed=1)
    for line in text.splitlines():
        numbers = [int(n) for n in re.findall(r"\d+", line)]
        assert numbers[0] + numbers[1] == numbers[-1]
    later = "".join(p.prompt + demonstration(p, np.random.default_rng(0)) for p in problems(200, 5))
    assert set(later) <= set(text)  # a char tokenizer trained on the corpus covers SFT and RL


def test_max_operand_bounds_every_file(tmp_path):
    write_task(tmp_path, n_sft=50, n_prompts=40, max_operand=9)
    corpus = (tmp_path / "corpus.txt").read_text().splitlines()
    assert all(int(n) <= 18 for line in corpus for n in re.findall(r"\d+", line))
    records = [json.loads(r) for r in (tmp_path / "label.jsonl").read_text().splitlines()]
    assert max(max(r["a"], r["b"]) for r in records) <= 9
    assert len(records) == 40
    with pytest.raises(SelfsupError, match="--max-operand"):
        write_task(tmp_path, max_operand=0)


def test_noiseless_labeler_ranks_by_gold_with_ties():
    rng = np.random.default_rng(0)
    assert simulated_ranking([0.5, 1.5, 0.0, 0.5], rng, noise=0.0) == "B > A = D > C"


def test_noisy_labelers_agree_with_gold_mostly_not_always():
    rng = np.random.default_rng(0)
    gold = [1.5, 1.0, 0.5, 0.0]
    agree = total = ties = 0
    for _ in range(500):
        ranking = simulated_ranking(gold, rng, noise=0.2)
        pairs = ranking_pairs(ranking, 4)
        agree += sum(gold[w] > gold[l] for w, l in pairs)
        total += len(pairs)
        ties += 6 - len(pairs)
    assert 0.9 < agree / total < 1.0
    assert ties > 0
