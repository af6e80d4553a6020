"""Reward-model (Bradley–Terry from rankings) and PPO losses against hand computations."""

import math

import numpy as np
import pytest
import torch

from selfsup.core.errors import SelfsupError
from selfsup.lm.losses.ppo import (
    gae,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    token_logprobs,
    value_loss,
)
from selfsup.lm.losses.preference import (
    format_ranking,
    pair_agreement,
    pairwise_accuracy,
    pairwise_ranking_loss,
    parse_ranking,
    ranking_pairs,
)


def test_ranking_with_ties_gives_only_strict_pairs():
    assert parse_ranking("D > C > A = B", 4) == [[3], [2], [0, 1]]
    assert ranking_pairs("D > C > A = B", 4) == [(3, 2), (3, 0), (3, 1), (2, 0), (2, 1)]
    assert ranking_pairs("A = B", 2) == []
    assert ranking_pairs("B>A", 2) == [(1, 0)]


@pytest.mark.parametrize(
    "ranking, k, words",
    [
        ("D > C > A", 4, "missing B"),
        ("A > E > B", 3, "unknown E"),
        ("A > A > B", 2, "repeated A"),
        ("A >> B", 2, "expected letters"),
        ("a > b", 2, "expected letters"),
    ],
)
def test_bad_rankings_say_what_is_wrong(ranking, k, words):
    with pytest.raises(SelfsupError, match=words):
        parse_ranking(ranking, k)


def test_format_ranking_inverts_parse():
    scores = [1.0, 3.0, 1.0, 2.0]
    text = format_ranking(scores)
    assert text == "B > D > A = C"
    pairs = ranking_pairs(text, 4)
    assert all(scores[w] > scores[l] for w, l in pairs)
    assert len(pairs) == 5  # 6 pairs minus the tie A = C


def test_pair_agreement_credits_ties_half():
    # "A > B = C" orders two pairs strictly, (A, B) and (A, C); B = C gives none.
    assert pair_agreement("A > B = C", [1.0, 2.0, 2.0]) == (0.0, 2)  # both reversed
    assert pair_agreement("A > B = C", [2.0, 1.0, 2.0]) == (1.5, 2)  # agrees once, ties once
    assert pair_agreement("A = B = C", [3.0, 2.0, 1.0]) == (0.0, 0)


def test_a_second_noisy_labeler_agrees_less_the_noisier_they_are():
    from selfsup.lm.data.arithmetic import labeler_scores, simulated_ranking

    rng = np.random.default_rng(0)
    gold = [[1.5, 1.0, 0.5, 0.0, -0.5, 1.0] for _ in range(300)]

    def agreement(noise: float) -> float:
        credit = pairs = 0
        for g in gold:
            c, n = pair_agreement(simulated_ranking(g, rng, noise), labeler_scores(g, rng, noise))
            credit, pairs = credit + c, pairs + n
        return credit / pairs

    assert agreement(0.0) == 1.0
    assert 0.5 < agreement(1.0) < agreement(0.2) < 1.0


def test_pairwise_loss_is_mean_over_prompts_of_mean_over_pairs():
    # prompt 0: four completions ranked "D > C > A = B" (5 pairs); prompt 1: two, "B > A".
    rewards = torch.tensor([0.1, -0.2, 0.05, 1.0, 0.3, 0.7], requires_grad=True)  # C < A: one miss
    pairs0 = ranking_pairs("D > C > A = B", 4)
    pairs = torch.tensor(pairs0 + [(5, 4)])
    prompt = torch.tensor([0] * 5 + [1])
    loss = pairwise_ranking_loss(rewards, pairs, prompt)

    def nll(w, l):
        return -math.log(1 / (1 + math.exp(-(rewards[w].item() - rewards[l].item()))))

    expected = (sum(nll(w, l) for w, l in pairs0) / 5 + nll(5, 4)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert rewards.grad[3] < 0 < rewards.grad[1]  # push the winner up, the loser down
    assert pairwise_accuracy(rewards.detach(), pairs) == pytest.approx(5 / 6)


def test_pair_accuracy_counts_a_tied_reward_half_like_the_labelers_agreement() -> None:
    rewards = torch.tensor([0.5, 0.5, 0.2])  # A and B the same answer: the same reward
    pairs = torch.tensor(ranking_pairs("A > B > C", 3))  # (A, B), (A, C), (B, C)
    assert pairwise_accuracy(rewards, pairs) == pytest.approx((0.5 + 1 + 1) / 3)
    assert pair_agreement("A > B > C", rewards.tolist()) == (2.5, 3)


def test_full_tie_batch_is_an_error():
    with pytest.raises(SelfsupError, match="full tie"):
        pairwise_ranking_loss(torch.zeros(2), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0))


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -0.4, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = shaped_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, beta=0.1)
    expected = torch.tensor([[-0.05, 0.0, 0.05 + 2.0], [-0.05, 0.01 - 1.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [0.5, -0.1, 0.0]]))


def test_gae_matches_the_recursion_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, -1.0, 9.0]])  # 9.0 sits on padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.5
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: δ2 = 1 - .6, δ1 = 0 + .9*.6 - .4, δ0 = .9*.4 - .2
    d2, d1, d0 = 0.4, 0.14, 0.16
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1 ends after token 1: δ1 = 2 - (-1) = 3 (no bootstrap from the padding's 9.0)
    b1 = 3.0
    b0 = 0.5 + gamma * -1.0 - 1.0 + gamma * lam * b1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(ret, (adv + values * mask) * mask)


def test_gae_with_lambda_one_is_return_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.ones(3, 6)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    future = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, future - values)
    torch.testing.assert_close(ret, future)


def test_whiten_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = masked_whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0, abs=1e-6)
    assert real.std().item() == pytest.approx(1, abs=1e-4)
    assert w[0, 2] == 0


def test_policy_loss_clips_the_ratio():
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    loss, clip_fraction, _ = policy_loss(old.clone(), old, adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item())  # ratio 1: minus the mean advantage
    assert clip_fraction.item() == 0
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5]]))  # ratios 1.5, 1.5, 0.5
    loss, clip_fraction, _ = policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: A>0, ratio 1.5 -> clipped to 1.2; token 1: A<0, ratio 1.5 -> unclipped 1.5 (worse);
    # token 2: A>0, ratio 0.5 -> unclipped 0.5 (pessimistic min)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 2 * 0.5) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)


def test_value_loss_clips_around_old_values():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-2)², (0.2-2)²) = 3.24; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1) / 2)


def test_token_logprobs_against_a_language_models_own_loss():
    """Independent references: transformers' GPT-2 cross-entropy (its `labels` loss) and the
    softmax written out in float64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    )
    ids = torch.randint(0, 11, (3, 8))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    logprobs = token_logprobs(out.logits[:, :-1], ids[:, 1:])
    assert logprobs.shape == (3, 7)
    torch.testing.assert_close(-logprobs.mean(), out.loss, atol=1e-5, rtol=0)
    logits = out.logits[:, :-1].double()
    for b in range(3):
        for t in range(7):
            row = [math.exp(v) for v in logits[b, t].tolist()]
            expected = math.log(row[ids[b, t + 1]] / sum(row))
            assert logprobs[b, t].item() == pytest.approx(expected, abs=1e-5)
