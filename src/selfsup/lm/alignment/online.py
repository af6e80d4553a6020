"""The online loop of the stages that sample from the policy they train (`lm rlhf`: PPO,
`lm grpo`), and what it stands on: the policy, reward model and prompts it loads, the held-out
evaluation, the divergence stop and the Ctrl-C hint.

One run: load the models and prompts, claim the run folder, evaluate the starting policy
(iteration 0 of eval.csv), then each iteration draw prompts, let the stage sample, score and
update (`OnlineStage.step`), log its statistics to metrics.csv and every `--eval-every`
iterations (and at the last) evaluate on the held-out prompts and save the policy as
RUN/iterNNNN; at the end RUN/answers.json and RUN/hf. A NaN statistic or a KL past `--max-kl`
stops the run naming the last good policy; Ctrl-C names the last policy saved. These stages
do not resume: the policies they save are their checkpoints.

With `--devices N` (N > 1) the loop runs in N processes forked once the models and prompts are
loaded (Lightning Fabric's DDP: gloo on a CPU, NCCL on GPUs): every process draws the same
prompts, samples, scores and updates on its contiguous share of them (a GRPO prompt's whole group
on one process, so its advantages are those of one process), the gradients are all-reduced, the
statistics averaged over the processes, and rank 0 evaluates and writes the run folder. The
prompts per iteration and --minibatch must split evenly over the processes (each then takes
minibatches of --minibatch / N answers: N processes update as one would). `--accumulate K` cuts
each process's minibatch again, into K micro-batches whose gradients add up to its own before one
optimiser step (the stage weighs each by what its loss normalises by; `check_accumulate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.engine.device import uses_cuda
from selfsup.engine.distributed import check_devices, mean_over_processes, share
from selfsup.engine.progress import show_bars
from selfsup.engine.trainer import lightning_devices, many_process_strategy
from selfsup.lm.alignment.ppo import GoldFn, kl_to_reference
from selfsup.lm.alignment.rollout import decode_responses, forward_response, reward_scores, sample
from selfsup.lm.data.arithmetic import gold_score, problem_of
from selfsup.lm.data.chat_data import add_chat_tokens
from selfsup.lm.data.context import fit_prompt, shortest_context
from selfsup.lm.data.conversations import Message, prompt_lines, read_prompts
from selfsup.lm.models import hf, lora

GOLDS = ("none", "arithmetic")
ANSWERS = "answers.json"


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
    """(tokenizer, causal LM in eval mode) of an SFT run or HF folder with chat markers (a LoRA
    run's adapter merged into its base)."""
    from transformers import AutoModelForCausalLM

    tokenizer, model = lora.load_tokenizer_and(path, AutoModelForCausalLM)
    if add_chat_tokens(tokenizer):
        raise SelfsupError(
            f"{path} has no chat markers in its tokenizer: fine-tune it with `selfsup lm sft` first"
        )
    return tokenizer, model.eval()


def load_reward_model(path: str | Path, tokenizer: Any) -> Any:
    """The reward model of a run or HF folder, refused when its vocabulary is not the policy's."""
    from transformers import AutoModelForSequenceClassification

    rm_tokenizer, model = lora.load_tokenizer_and(path, AutoModelForSequenceClassification)
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SelfsupError(
            f"the reward model in {path} has another vocabulary than the policy: train it from "
            "the same SFT run (selfsup lm reward --init SFT_RUN)"
        )
    return model.eval()


class Sampling(Protocol):
    """How answers are sampled and scored (PPOSettings, a stage's Options)."""

    max_new_tokens: int
    no_end_score: float


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    reference: Any,
    reward_model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    gold: GoldFn | None,
    settings: Sampling,
    seed: int,
    batch: int = 32,
    proxy: Callable[[Any, list[int]], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Proxy reward, gold score and KL(π || π_ref) of one sampled answer per held-out prompt;
    the proxy is `proxy(rollout, prompt indices)` where given (NaN: unscored), else the reward
    model's."""
    scores, golds, kls, ended = [], [], [], []
    for s in range(0, len(conversations), batch):
        part = conversations[s : s + batch]
        r = sample(policy, tokenizer, part, settings.max_new_tokens, 1.0, 0, seed + s)
        if proxy is not None:
            score = proxy(r, list(range(s, s + len(part))))
        else:
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
        "proxy": float(np.nanmean(scores)),
        "kl": float(np.mean(kls)),
        "ended": float(np.mean(ended)),
    }
    if gold is not None:
        out["gold"] = float(np.mean(golds))
    return out


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


@dataclass
class Inputs:
    """What an online run loads before its run folder: models and prompts, fitted to them."""

    tokenizer: Any
    policy: Any
    reward_model: Any  # None where the stage scores without one (grpo --reward-fn alone)
    conversations: list[list[Message]]  # the rollouts' prompts
    gold: GoldFn | None  # of those, by prompt index
    eval_conversations: list[list[Message]]  # the held-out ones (the first --eval-samples)
    eval_gold: GoldFn | None


def load_inputs(config: Any) -> Inputs:
    """The policy, reward model and prompts of `config` (OnlineOptions with max_new_tokens),
    each prompt fitted to both models' context."""
    held_out = config.eval_prompts or config.prompts
    _, records = load_prompts(config.prompts)
    _, eval_records = load_prompts(held_out)
    gold = gold_fn(config.gold, records)
    eval_gold = gold_fn(config.gold, eval_records[: config.eval_samples])
    tokenizer, policy = load_policy(config.policy)
    reward_model = load_reward_model(config.reward, tokenizer) if config.reward else None
    policy = lora.adapt(policy, config, config.policy, tokenizer)  # --lora-r
    models = (policy,) if reward_model is None else (policy, reward_model)
    new, cut = config.max_new_tokens, config.truncate
    conversations = fitted_prompts(config.prompts, tokenizer, models, new, cut)
    eval_conv = fitted_prompts(held_out, tokenizer, models, new, cut)[: config.eval_samples]
    return Inputs(tokenizer, policy, reward_model, conversations, gold, eval_conv, eval_gold)


class Policies(Protocol):
    """A stage's trainer as the loop sees it: the policy it trains and its frozen start."""

    policy: Any
    reference: Any


T = TypeVar("T", bound=Policies)


@dataclass(frozen=True)
class OnlineStage(Generic[T]):
    """What one online stage supplies to `run_online`; the rest is the loop's."""

    name: str  # "PPO": the progress bar and the divergence stop
    stage: str  # "rlhf": config.yaml's stage and the Ctrl-C hint
    prompts_per_iteration: int  # drawn with replacement only when there are fewer prompts
    finite: tuple[str, ...]  # statistics that must stay finite (`diverged`)
    trainer: Callable[[Inputs, Any], T]  # (inputs, Fabric) -> the stage's trainer
    step: Callable[[T, Inputs, list[int], int], dict[str, float]]  # (.., prompts, seed) -> stats
    # the held-out proxy as (rollout, eval prompt indices) -> rewards (None: the reward model's)
    proxy: Callable[[Inputs], Callable[[Any, list[int]], torch.Tensor]] | None = None


@rundir.releases_run_locks  # the run lock RunFolder.claim takes
def run_online(config: Any, command: str | None, stage: OnlineStage[Any]) -> Path:
    """Run `stage` with `config` (its Options: OnlineOptions with iterations, max_new_tokens,
    no_end_score, max_kl); returns the run directory."""
    inputs = load_inputs(config)
    folder = rundir.RunFolder.claim(config.out, resume=False, early={"eval.csv"})
    folder.begin({"stage": stage.stage, **dataclasses.asdict(config)}, command or "")
    folder.kept = _saved_policy  # claimed as any run; from here its policies are what it keeps
    try:
        with folder.removed_unless_kept():
            ended = online_fabric(config).launch(_launched, folder, config, stage, inputs)
            if isinstance(ended, BaseException):  # rank 0's one line (a process forked)
                raise ended
            return folder.path
    except KeyboardInterrupt:
        saved = _saved(config, folder.path)
        raise KeyboardInterrupt(interrupted_hint(stage.stage, saved, folder.path)) from None


def _saved_policy(run: Path) -> bool:
    return any(run.glob("iter[0-9]*"))


def _saved(config: Any, run: Path) -> list[str]:
    """The policies so far: --policy, then those the run saved (from finite updates)."""
    return [f"the starting one, {config.policy}", *map(str, sorted(run.glob("iter[0-9]*")))]


def online_fabric(config: Any) -> Any:
    """The Fabric of an online run: `--devices N` processes (DDP, forked at `launch`) or one."""
    import lightning as L

    check_devices(config.accelerator, config.devices)
    count = lightning_devices(str(config.devices), uses_cuda(config.accelerator))
    strategy = many_process_strategy("fork", count)  # ddp under torchrun/SLURM: no fork
    return L.Fabric(
        accelerator=config.accelerator, devices=count, precision=config.precision,
        strategy=strategy,
    )  # fmt: skip


def _launched(
    fabric: Any, folder: rundir.RunFolder, config: Any, stage: OnlineStage[Any], inputs: Inputs
) -> BaseException | None:
    """The loop in one of the processes; its one-line error returned, not raised (a forked
    process's exception would reach the command as a traceback)."""
    try:
        _iterations(fabric, folder, config, stage, inputs, _saved(config, folder.path))
    except (SelfsupError, KeyboardInterrupt) as e:
        return e
    return None


def check_shares(config: Any, prompts: int, world: int) -> None:
    """One line unless the prompts of an iteration and --minibatch split evenly over `world`
    processes (every process then makes the same number of updates), and each share of
    --minibatch into --accumulate micro-batches."""
    for flag, value in (("prompts per iteration", prompts), ("--minibatch", config.minibatch)):
        if value % world:
            raise SelfsupError(
                f"{flag} {value} do not split evenly over --devices {config.devices} "
                f"({world} processes)"
            )
    check_accumulate(config, world)


def check_accumulate(config: Any, world: int = 1) -> None:
    """One line unless each process's share of --minibatch (of `world`) splits into
    --accumulate equal micro-batches."""
    if (config.minibatch // world) % config.accumulate:
        where = f" (its share on each of {world} processes)" if world > 1 else ""
        raise SelfsupError(
            f"--minibatch {config.minibatch}{where} is not divisible by --accumulate "
            f"{config.accumulate}: each update is cut into that many equal micro-batches"
        )


def _iterations(
    fabric: Any,
    folder: rundir.RunFolder,
    config: Any,
    stage: OnlineStage[Any],
    inputs: Inputs,
    saved: list[str],
) -> Path:
    run, world, first = folder.path, fabric.world_size, fabric.global_rank == 0
    check_shares(config, stage.prompts_per_iteration, world)
    torch.manual_seed(config.seed)
    trainer = stage.trainer(inputs, fabric)
    if inputs.reward_model is not None:
        fabric.to_device(inputs.reward_model.requires_grad_(False))
    tokenizer, eval_conv = inputs.tokenizer, inputs.eval_conversations
    proxy = stage.proxy(inputs) if stage.proxy else None

    def report(iteration: int) -> None:
        if not first:  # rank 0 evaluates and saves
            return
        stats = evaluate_policy(
            lora.sampled(trainer.policy), trainer.reference, inputs.reward_model, tokenizer,
            eval_conv, inputs.eval_gold, config, seed=10_000, proxy=proxy,
        )  # fmt: skip
        folder.append_metrics({"iteration": iteration, **stats}, "eval.csv")
        print(f"iteration {iteration}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
        if iteration:  # iteration 0 is --policy itself
            name = f"iter{iteration:04d}"
            hf.save_hf(run, trainer.policy, tokenizer, name)  # loads like RUN/hf
            saved.append(str(run / name))

    report(0)
    rng = np.random.default_rng(config.seed)
    shown = show_bars(config.progress) and first
    bar = tqdm(range(1, config.iterations + 1), desc=stage.name, disable=not shown)
    count, n = len(inputs.conversations), stage.prompts_per_iteration
    for iteration in bar:
        idx = rng.choice(count, n, replace=count < n).tolist()
        mine = idx[share(n, fabric.global_rank, world)]  # every process draws them all
        stats = stage.step(trainer, inputs, mine, config.seed + iteration)
        stats = mean_over_processes(stats, fabric.device)
        problem = diverged(stats, config.max_kl, stage.finite)
        if problem:
            raise stopped(stage.name, iteration, problem, saved, run)
        if first:
            folder.append_metrics({"iteration": iteration, **stats})
        bar.set_postfix(reward=f"{stats['reward']:.2f}", kl=f"{stats['kl']:.2f}")
        if iteration % config.eval_every == 0 or iteration == config.iterations:
            report(iteration)
    if not first:
        return run
    write_answers(
        run, trainer.reference, lora.sampled(trainer.policy), tokenizer, eval_conv,
        inputs.eval_gold, config.max_new_tokens,
    )  # fmt: skip
    hf.save_hf(run, trainer.policy, tokenizer)
    return run
