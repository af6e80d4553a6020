"""The RLHF stage and its measurements: PPO runs, best-of-n, simulated labeling, gold vs KL.

- `rlhf`: PPO from an SFT model against a reward model (`selfsup lm rlhf`), evaluating the
  policy on held-out prompts every few iterations (proxy reward, gold score when known, KL from
  the reference) and saving the policy at each evaluation (RUN/hf is the last; RUN/iterNNNN
  the others).
- `best_of_n`: the training-free baseline -- sample n answers, keep the reward model's favourite;
  its KL from the policy is at most log n - (n-1)/n (Stiennon et al., 2020).
- `label`: sample K answers per prompt from a model and let the simulated labelers rank them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from selfsup.core import run as rundir
from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.ppo import GoldFn, PPOTrainer, kl_to_reference
from selfsup.lm.alignment.rollout import decode_responses, forward_response, reward_scores, sample
from selfsup.lm.alignment.stage import Stage, policy_summary
from selfsup.lm.data.arithmetic import (
    gold_score,
    labeler_scores,
    problem_of,
    simulated_ranking,
)
from selfsup.lm.data.chat_data import add_chat_tokens
from selfsup.lm.data.context import context_length, fit_prompt, shortest_context
from selfsup.lm.data.conversations import Message, prompt_lines, read_prompts
from selfsup.lm.losses.preference import pair_agreement
from selfsup.lm.models import hf
from selfsup.lm.options import OnlineOptions, PPOSettings, check_declared, check_one_device

GOLDS = ("none", "arithmetic")


@dataclass
class Options(PPOSettings, OnlineOptions):
    """Options of `selfsup lm rlhf` (PPO's knobs plus the run's inputs)."""

    iterations: int = option(
        50, "PPO iterations (sample, score, update); RLHF counts iterations, not steps", check=">=1"
    )
    max_kl: float = option(
        0.0,
        "stop when the rollouts' mean KL from the reference exceeds this (0: no bound)",
        check=">=0",
    )


def gold_fn(name: str, records: Sequence[dict[str, Any]]) -> GoldFn | None:
    """--gold NAME as a function of (prompt index, answer), or None for `none`."""
    if name not in GOLDS:
        raise SelfsupError(f"--gold {name!r} is unknown; expected one of {', '.join(GOLDS)}")
    if name == "none":
        return None
    problems = [problem_of(r) for r in records]
    return lambda i, answer: gold_score(problems[i], answer)


def load_prompts(path: str) -> tuple[list[list[Message]], list[dict[str, Any]]]:
    """(conversations, records) of a prompts JSONL."""
    items = read_prompts(path)
    return [m for m, _ in items], [r for _, r in items]


def fitted_prompts(
    path: str, tokenizer: Any, models: Sequence[Any], max_new_tokens: int, truncate: bool
) -> list[list[Message]]:
    """The conversations of a prompts JSONL, each leaving `max_new_tokens` in the context of
    every one of `models` (`fit_prompt`: refused naming its line, or cut with `truncate`)."""
    context = shortest_context(*models)
    return [
        fit_prompt(tokenizer, messages, context, max_new_tokens, where, truncate)
        for where, messages, _ in prompt_lines(path)
    ]


def load_policy(path: str | Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    tokenizer, model = hf.load_tokenizer_and(path, AutoModelForCausalLM)
    _require_chat(tokenizer, path)
    return tokenizer, model.eval()


def load_reward_model(path: str | Path, tokenizer: Any) -> Any:
    from transformers import AutoModelForSequenceClassification

    rm_tokenizer, model = hf.load_tokenizer_and(path, AutoModelForSequenceClassification)
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SelfsupError(
            f"the reward model in {path} has another vocabulary than the policy: train it from "
            "the same SFT run (selfsup lm reward --init SFT_RUN)"
        )
    return model.eval()


def _require_chat(tokenizer: Any, path: str | Path) -> None:
    if add_chat_tokens(tokenizer):
        raise SelfsupError(
            f"{path} has no chat markers in its tokenizer: fine-tune it with `selfsup lm sft` first"
        )


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    reference: Any,
    reward_model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    gold: GoldFn | None,
    settings: PPOSettings,
    seed: int,
    batch: int = 32,
) -> dict[str, float]:
    """Proxy reward, gold score and KL(π || π_ref) of one sampled answer per held-out prompt."""
    scores, golds, kls, ended = [], [], [], []
    for s in range(0, len(conversations), batch):
        part = conversations[s : s + batch]
        r = sample(policy, tokenizer, part, settings.max_new_tokens, 1.0, 0, seed + s)
        score = reward_scores(reward_model, r)
        score = torch.where(r.ended, score, torch.full_like(score, settings.no_end_score))
        _, logprobs, _ = forward_response(policy, r)
        _, ref_logprobs, _ = forward_response(reference, r)
        kls.extend(kl_to_reference(logprobs, ref_logprobs, r.response_mask.float()).tolist())
        scores.extend(score.tolist())
        ended.extend(r.ended.float().tolist())
        if gold is not None:
            golds.extend(gold(s + i, a) for i, a in enumerate(decode_responses(tokenizer, r)))
    out = {
        "proxy": float(np.mean(scores)),
        "kl": float(np.mean(kls)),
        "ended": float(np.mean(ended)),
    }
    if gold is not None:
        out["gold"] = float(np.mean(golds))
    return out


@rundir.releases_run_locks  # the run lock start_run takes
def rlhf(config: Options, command: str | None = None) -> Path:
    """PPO against the reward model; returns the run directory."""
    check_options(config)
    conversations, records = load_prompts(config.prompts)
    eval_conv, eval_records = load_prompts(config.eval_prompts or config.prompts)
    eval_conv, eval_records = eval_conv[: config.eval_samples], eval_records[: config.eval_samples]
    gold = gold_fn(config.gold, records)
    eval_gold = gold_fn(config.gold, eval_records)
    tokenizer, policy = load_policy(config.policy)
    reward_model = load_reward_model(config.reward, tokenizer)
    models, new, cut = (policy, reward_model), config.max_new_tokens, config.truncate
    conversations = fitted_prompts(config.prompts, tokenizer, models, new, cut)
    eval_conv = fitted_prompts(config.eval_prompts or config.prompts, tokenizer, models, new, cut)
    eval_conv = eval_conv[: config.eval_samples]
    run = hf.start_run(
        config.out, {"stage": "rlhf", **dataclasses.asdict(config)}, command or "", False
    )
    saved = [f"the starting one, {config.policy}"]  # the policies so far, from finite updates
    try:
        with hf.removed_unless_kept(run, lambda r: any(r.glob("iter[0-9]*"))):
            return _ppo_run(
                run, config, tokenizer, policy, reward_model, conversations, gold, eval_conv,
                eval_gold, saved,
            )  # fmt: skip
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_hint("rlhf", saved, run)) from None


def interrupted_hint(stage: str, saved: list[str], run: Path) -> str:
    """What a Ctrl-C of a sampling stage kept: the last policy saved (these stages do not
    resume), or that the same command starts afresh when none was."""
    if len(saved) == 1:
        return (
            "no policy was saved yet: run the same command again to start afresh in "
            f"{shlex.quote(str(run))}"
        )
    return (
        f"the last policy saved is {saved[-1]} (selfsup lm chat {shlex.quote(saved[-1])}); "
        f"{stage} does not resume: run it again with another --out to train further"
    )


def check_options(config: Options) -> None:
    """One line for a missing or impossible option, before any file is read or written."""
    check_declared(config)  # required, and the ranges its fields declare
    if config.rollouts < config.minibatch:
        raise SelfsupError(f"--minibatch {config.minibatch} exceeds --rollouts {config.rollouts}")
    if not math.isfinite(config.no_end_score) or not math.isfinite(config.temperature):
        raise SelfsupError("--no-end-score and --temperature must be finite numbers")
    hf.check_accelerator(config.accelerator)
    hf.check_precision(config.precision)
    check_one_device(config.devices)


def _ppo_run(
    run: Path,
    config: Options,
    tokenizer: Any,
    policy: Any,
    reward_model: Any,
    conversations: list[list[Message]],
    gold: GoldFn | None,
    eval_conv: list[list[Message]],
    eval_gold: GoldFn | None,
    saved: list[str],
) -> Path:
    import lightning as L

    torch.manual_seed(config.seed)
    fabric = L.Fabric(accelerator=config.accelerator, devices=1, precision=config.precision)
    trainer = PPOTrainer(policy, reward_model, tokenizer, config, fabric)
    rng = np.random.default_rng(config.seed)
    settings = PPOSettings(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(PPOSettings)}
    )

    def report(iteration: int) -> None:
        stats = evaluate_policy(
            trainer.policy, trainer.reference, trainer.reward_model, tokenizer,
            eval_conv, eval_gold, settings, seed=10_000,
        )  # fmt: skip
        hf.append_metrics(run, {"iteration": iteration, **stats}, "eval.csv")
        print(f"iteration {iteration}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
        if iteration:  # iteration 0 is --policy itself
            name = f"iter{iteration:04d}"
            hf.save_hf(run, trainer.policy, tokenizer, name)  # loads like RUN/hf
            saved.append(str(run / name))

    report(0)
    progress = config.progress if config.progress is not None else sys.stderr.isatty()
    bar = tqdm(range(1, config.iterations + 1), desc="PPO", disable=not progress)
    for iteration in bar:
        idx = rng.choice(
            len(conversations), config.rollouts, replace=len(conversations) < config.rollouts
        )
        batch_gold = None if gold is None else (lambda i, a, idx=idx: gold(int(idx[i]), a))
        stats = trainer.step(
            [conversations[i] for i in idx], seed=config.seed + iteration, gold=batch_gold
        )
        problem = diverged(stats, config.max_kl)
        if problem:
            raise stopped("PPO", iteration, problem, saved, run)
        hf.append_metrics(run, {"iteration": iteration, **stats})
        bar.set_postfix(reward=f"{stats['reward']:.2f}", kl=f"{stats['kl']:.2f}")
        if iteration % config.eval_every == 0 or iteration == config.iterations:
            report(iteration)
    write_answers(
        run, trainer.reference, trainer.policy, tokenizer, eval_conv, eval_gold,
        config.max_new_tokens,
    )  # fmt: skip
    hf.save_hf(run, trainer.policy, tokenizer)
    return run


ANSWERS = "answers.json"


def write_answers(
    run: Path,
    reference: Any,
    policy: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    gold: GoldFn | None,
    max_new_tokens: int,
    count: int = 8,
    seed: int = 0,
) -> Path:
    """RUN/answers.json, for the report: one answer to each of the first `count` held-out
    prompts from the SFT model (`before`) and from the trained policy (`after`), sampled with
    the same seed, with their gold scores where the task has one."""
    part = list(conversations[:count])
    answers = {
        name: decode_responses(
            tokenizer, sample(model, tokenizer, part, max_new_tokens, 1.0, 0, seed)
        )
        for name, model in (("before", reference), ("after", policy))
    }
    rows: list[dict[str, Any]] = []
    for i, conversation in enumerate(part):
        row: dict[str, Any] = {"prompt": conversation[-1]["content"]}
        for name in ("before", "after"):
            row[name] = answers[name][i]
            if gold is not None:
                row[f"gold {name}"] = round(float(gold(i, answers[name][i])), 3)
        rows.append(row)
    path = run / ANSWERS
    rundir.atomic_write_text(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return path


def stopped(stage: str, iteration: int, problem: str, saved: list[str], run: Path) -> SelfsupError:
    """The error that ends a diverged run: what went wrong and the last good policy to load
    (the run folder is removed when no policy was saved in it)."""
    return SelfsupError(
        f"{stage} stopped at iteration {iteration}: {problem}; the last good policy is "
        f"{saved[-1]} (lower --lr, raise --beta)"
        + ("" if len(saved) > 1 else f"; {run} is removed")
    )


def diverged(
    stats: dict[str, float],
    max_kl: float,
    finite: Sequence[str] = ("ppo/policy", "ppo/value", "reward", "kl"),
) -> str | None:
    """Why an iteration's statistics say the run has gone wrong (one of `finite` is NaN or
    infinite, or the KL exceeds a positive `max_kl`), or None."""
    for name in finite:
        if not math.isfinite(stats[name]):
            return f"{name} became {stats[name]}"
    if max_kl > 0 and stats["kl"] > max_kl:
        return f"the KL from the reference, {stats['kl']:.2f}, exceeds --max-kl {max_kl:g}"
    return None


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
    if not math.isfinite(no_end_score):
        raise SelfsupError(f"--no-end-score must be a finite number, got {no_end_score}")
    for flag, value in (("--limit", limit), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise SelfsupError(f"{flag} must be at least 1, got {value}")
    if pool < 0:
        raise SelfsupError(f"--pool must be at least 0 (0: the largest n), got {pool}")
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
    if not 2 <= k <= 26:
        raise SelfsupError(f"--k must be between 2 and 26 answers per prompt, got {k}")
    hf.check_number("--noise", noise, 0)
    if max_new_tokens < 1:
        raise SelfsupError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
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
