"""The RLHF stage and its measurements: PPO runs, best-of-n, simulated labeling, gold vs KL.

- `rlhf`: PPO from an SFT model against a reward model (`selfsup lm rlhf`), on the online loop
  (`online.run_online`: held-out evaluation every few iterations, the policy saved at each, RUN/hf
  the last); this file supplies PPO's trainer and its iteration (experience, then updates).
- `best_of_n`: the training-free baseline -- sample n answers, keep the reward model's favourite;
  its KL from the policy is at most log n - (n-1)/n (Stiennon et al., 2020).
- `label`: sample K answers per prompt from a model and let the simulated labelers rank them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.engine.distributed import check_devices
from selfsup.lm.alignment.online import (
    Inputs,
    OnlineStage,
    check_accumulate,
    fitted_prompts,
    gold_fn,
    load_policy,
    load_prompts,
    load_reward_model,
    run_online,
)
from selfsup.lm.alignment.online import evaluate_policy as evaluate_policy  # docs, benchmarks
from selfsup.lm.alignment.ppo import PPOTrainer
from selfsup.lm.alignment.rollout import decode_responses, reward_scores, sample
from selfsup.lm.alignment.stage import Stage, policy_summary
from selfsup.lm.data.arithmetic import labeler_scores, simulated_ranking
from selfsup.lm.data.context import context_length, fit_prompt
from selfsup.lm.data.conversations import Message
from selfsup.lm.losses.preference import pair_agreement
from selfsup.lm.models import hf, lora
from selfsup.lm.options import OnlineOptions, PPOSettings, check_declared


@dataclass
class Options(PPOSettings, OnlineOptions):
    """Options of `selfsup lm rlhf` (PPO's knobs plus the run's inputs)."""

    iterations: int = option(
        50, "PPO iterations (sample, score, update); RLHF counts iterations, not steps", check=">=1"
    )


def rlhf(config: Options, command: str | None = None) -> Path:
    """PPO against the reward model; returns the run directory."""
    check_options(config)
    stage = OnlineStage(
        "PPO", "rlhf", config.rollouts, ("ppo/policy", "ppo/value", "reward", "kl"),
        lambda inputs, fabric: PPOTrainer(
            inputs.policy, inputs.reward_model, inputs.tokenizer, config, fabric
        ),
        _ppo_step,
    )  # fmt: skip
    return run_online(config, command, stage)


def _ppo_step(trainer: PPOTrainer, inputs: Inputs, idx: list[int], seed: int) -> dict[str, float]:
    """One PPO iteration on the prompts `idx`: experience, then the updates."""
    gold = inputs.gold
    batch_gold = None if gold is None else (lambda i, a: gold(idx[i], a))
    return trainer.step([inputs.conversations[i] for i in idx], seed=seed, gold=batch_gold)


def check_options(config: Options) -> None:
    """One line for a missing or impossible option, before any file is read or written."""
    check_declared(config)  # required, and the ranges its fields declare
    if config.rollouts < config.minibatch:
        raise SelfsupError(f"--minibatch {config.minibatch} exceeds --rollouts {config.rollouts}")
    check_accumulate(config)
    hf.check_accelerator(config.accelerator)
    hf.check_precision(config.precision)
    check_devices(config.accelerator, config.devices)
    lora.check(config)


def best_of_n_mean(proxy: np.ndarray, values: np.ndarray, n: int) -> float:
    """The expected value (e.g. gold score) of the proxy's favourite among n answers drawn
    without replacement from each row's pool of N, averaged over rows: every one of the
    C(N, n) subsets counts, not just the first n, which cuts the estimate's variance at small n.

    The answer ranked r-th lowest by proxy is a subset's favourite in C(r-1, n-1) of them; ties
    go to the earlier answer, as `argmax` breaks them.
    """
    rows, pool = proxy.shape
    if not 1 <= n <= pool:
        raise SelfsupError(f"best-of-{n} needs 1 <= n <= the pool of {pool} answers")
    order = np.lexsort((-np.arange(pool)[None].repeat(rows, 0), proxy), axis=1)
    weights = np.array([math.comb(r, n - 1) for r in range(pool)], dtype=float)
    weights /= math.comb(pool, n)
    return float((np.take_along_axis(values, order, axis=1) * weights).sum(1).mean())


def best_of_n_kl(proxy: np.ndarray, n: int, decimals: int = 6) -> float:
    """KL(best-of-n || policy) per answer, averaged over rows, for n i.i.d. draws from each
    row's empirical answer distribution (its pool of N scored samples), not the bound
    log n - (n-1)/n. Answers the proxy scores alike (to `decimals`) form one level; with p_l the
    share of level l and F_l the share at or below it, best-of-n lands on level l with
    q_l = F_l^n - F_(l-1)^n and, within a level, as the policy does, so the KL is
    Σ q_l·log(q_l / p_l) (Beirami et al., 2024). Reliable for n well below N."""
    if n < 1:
        raise SelfsupError(f"best-of-{n}: n must be at least 1")
    total = 0.0
    for row in np.round(proxy, decimals):
        _, counts = np.unique(row, return_counts=True)  # levels, lowest first
        p = counts / counts.sum()
        upper = np.cumsum(p)
        q = upper**n - np.concatenate([[0.0], upper[:-1]]) ** n
        kept = q > 0
        total += float((q[kept] * np.log(q[kept] / p[kept])).sum())
    return total / len(proxy)


@torch.no_grad()
def best_of_n(
    policy_path: str,
    reward_path: str,
    prompts: str,
    ns: Sequence[int],
    gold_name: str = "none",
    max_new_tokens: int = 24,
    limit: int = 128,
    seed: int = 0,
    pool: int = 0,
    no_end_score: float = -1.0,
    truncate: bool = False,
) -> list[dict[str, float]]:
    """For each n: the gold score and proxy reward of the reward model's favourite of n samples,
    with the analytic KL bound log n - (n-1)/n. One pool of `pool` (default: max(ns)) samples
    per prompt serves every n, averaged over all its n-subsets (`best_of_n_mean`). An answer
    that does not end within `max_new_tokens` scores `no_end_score`, as in `lm rlhf`. A prompt
    too long for the models' context is refused, or with `truncate` cut (`fit_prompt`)."""
    tokenizer, policy = load_policy(policy_path)
    reward_model = load_reward_model(reward_path, tokenizer)
    conversations, records = load_prompts(prompts)
    records = records[:limit]
    conversations = fitted_prompts(
        prompts, tokenizer, (policy, reward_model), max_new_tokens, truncate
    )[:limit]
    gold = gold_fn(gold_name, records)
    pool = pool or max(ns)
    if pool < max(ns):
        raise SelfsupError(f"--pool {pool} is smaller than the largest n, {max(ns)}")
    proxy = np.zeros((len(conversations), pool))
    golds = np.zeros_like(proxy)
    for j in tqdm(range(pool), desc="best-of-n samples"):
        for s in range(0, len(conversations), 64):
            part = conversations[s : s + 64]
            r = sample(policy, tokenizer, part, max_new_tokens, 1.0, 0, seed + 1000 * j + s)
            score = reward_scores(reward_model, r)
            score = torch.where(r.ended, score, torch.full_like(score, no_end_score))
            proxy[s : s + len(part), j] = score
            if gold is not None:
                for i, a in enumerate(decode_responses(tokenizer, r)):
                    golds[s + i, j] = gold(s + i, a)
    rows = []
    for n in ns:
        row = {
            "n": n,
            "kl_bound": math.log(n) - (n - 1) / n,
            "proxy": best_of_n_mean(proxy, proxy, n),
        }
        if gold is not None:
            row["gold"] = best_of_n_mean(proxy, golds, n)
        rows.append(row)
    return rows


@torch.no_grad()
def label(
    policy_path: str,
    prompts: str,
    output: str,
    k: int = 4,
    gold_name: str = "arithmetic",
    noise: float = 0.2,
    max_new_tokens: int = 24,
    seed: int = 0,
    truncate: bool = False,
) -> dict[str, float]:
    """Write a rankings JSONL: K sampled answers per prompt, ranked by simulated labelers (a
    prompt too long for the context is refused, or with `truncate` cut: `fit_prompt`)."""
    tokenizer, policy = load_policy(policy_path)
    conversations, records = load_prompts(prompts)
    conversations = fitted_prompts(prompts, tokenizer, (policy,), max_new_tokens, truncate)
    gold = gold_fn(gold_name, records)
    if gold is None:
        raise SelfsupError("--gold none: the simulated labelers need a gold score to rank by")
    answers: list[list[str]] = [[] for _ in conversations]
    for j in tqdm(range(k), desc="sampling answers"):
        for s in range(0, len(conversations), 64):
            part = conversations[s : s + 64]
            r = sample(policy, tokenizer, part, max_new_tokens, 1.0, 0, seed + 1000 * j + s)
            for i, a in enumerate(decode_responses(tokenizer, r)):
                answers[s + i].append(a)
    rng, second = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    lines, ties, agreement, pairs = [], 0, 0.0, 0
    for i, conv in enumerate(conversations):
        scores = [gold(i, a) for a in answers[i]]
        ranking = simulated_ranking(scores, rng, noise=noise)
        ties += "=" in ranking
        credit, n = pair_agreement(ranking, labeler_scores(scores, second, noise=noise))
        agreement, pairs = agreement + credit, pairs + n
        record = {"prompt": conv[-1]["content"], "completions": answers[i], "ranking": ranking}
        lines.append(json.dumps({**record, "gold": scores}))  # never read by the reward model
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    stats = {
        "prompts": len(lines),
        "with_ties": ties / len(lines),
        "pairs": pairs,
        # How often a second simulated labeler, ranking the same answers, orders a pair the way
        # the first did (ties half): the ceiling a reward model's pair accuracy is read against.
        "labeler_agreement": agreement / max(1, pairs),
    }
    labeling_stats_path(out).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def labeling_stats_path(rankings: str | Path) -> Path:
    """Where `lm label` keeps the statistics of a rankings file (the report of a reward model
    trained on it reads the labelers' agreement there): RANKINGS.stats.json."""
    rankings = Path(rankings)
    return rankings.with_name(rankings.name + ".stats.json")


def chat_reply(
    model: Any, tokenizer: Any, messages: Sequence[Message], max_new_tokens: int, temperature: float
) -> str:
    """The model's next assistant turn (greedy at temperature 0). The conversation must fit the
    model's context (see `fit_context`)."""
    from selfsup.core.tokenizer import encode_text
    from selfsup.lm.alignment.rollout import encode_prompts, suppressed_tokens

    for m in messages:
        encode_text(tokenizer, m["content"], what=f"the {m['role']} message")
    prompts = encode_prompts(tokenizer, [messages])
    fit_prompt(tokenizer, messages, context_length(model), max_new_tokens, "the conversation",
               truncate=False)  # fmt: skip
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None}
        if temperature > 0
        else {"do_sample": False}
    )
    ids = model.generate(
        **prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=list(suppressed_tokens(tokenizer)),
        **sampling,
    )
    answer = ids[0, prompts["input_ids"].shape[1] :]
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


class RLHF(Stage):
    Options = Options
    help = "optimise an SFT model against a reward model with PPO"
    description = (
        "RLHF with PPO: per-token KL penalty to the SFT model, GAE, clipped surrogate and value "
        "losses. Writes a run directory."
    )
    entry = "rlhf"

    summary = staticmethod(policy_summary)
