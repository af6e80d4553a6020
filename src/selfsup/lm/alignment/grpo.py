"""GRPO (Shao et al., 2024): `selfsup lm grpo`.

One iteration: draw a few prompts, sample G answers to each from the policy, score them (the
reward model or the gold score, and the user's `--reward-fn` functions called as TRL calls them,
`rewards`; their weighted sum), standardise the rewards within each group into advantages, and
take clipped-ratio steps with the k3 estimate of the KL from the frozen SFT model as a loss term.
No value model. `--loss-type`, `--scale-rewards`, `--epsilon-high`, `--importance-sampling` and
`--skip-flat-groups` give Dr GRPO, DAPO and GSPO (`selfsup.lm.losses.grpo`). `--accumulate K`
takes each update in K micro-batches, one optimiser step on their gradients, each weighed so that
the loss is the whole minibatch's under every `--loss-type` (`micro_weights`). The loop, sampling,
scoring and held-out evaluation are those of the PPO stage (`online.run_online`, `rollout`), so
the two are measured alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.engine.distributed import check_devices
from selfsup.lm.alignment import rewards as rw
from selfsup.lm.alignment.online import (
    Inputs,
    OnlineStage,
    check_accumulate,
    load_prompts,
    run_online,
)
from selfsup.lm.alignment.ppo import disable_dropout, kl_to_reference, rollout_to, select_rollouts
from selfsup.lm.alignment.rollout import decode_responses, forward_response, reward_scores, sample
from selfsup.lm.alignment.stage import Stage, policy_summary
from selfsup.lm.data.conversations import Message
from selfsup.lm.losses import grpo as losses
from selfsup.lm.losses.grpo import flat_groups, group_advantages, grpo_loss, nanstd
from selfsup.lm.models import hf, lora
from selfsup.lm.options import OnlineOptions, OnlinePolicy, check_declared


@dataclass
class Options(OnlineOptions, OnlinePolicy):
    """Options of `selfsup lm grpo` (defaults after DeepSeekMath's GRPO, scaled down)."""

    reward: str = option("", "the reward-model run (or local HF folder); not needed when "
                         "--reward-fn functions alone score (proxy: their sum)")  # fmt: skip
    reward_from: str = option(
        "model",
        "what the answers are scored by, beside any --reward-fn: model (the reward model of "
        "--reward, when given) | gold (the known gold score itself: for analysis only, needs "
        "--gold)",
    )
    reward_fn: str = option(
        "",
        "a reward function FILE.py:NAME, called as TRL's: NAME(prompts, completions, "
        "completion_ids, **other prompt-file fields) -> a list of floats (None: no opinion); "
        "repeat the flag for several (kept as a comma list)",
        repeat=True,
    )
    reward_weights: str = option(
        "",
        "comma list of weights, one per reward: the reward model or gold first (when it scores), "
        "then each --reward-fn in order (default: all 1); the reward is their weighted sum",
    )
    iterations: int = option(50, "iterations (sample groups, score, update)", check=">=1")
    prompts_per_iteration: int = option(
        4, "prompts per iteration, each answered G times", check=">=1"
    )
    group_size: int = option(
        8, "answers per prompt (G); advantages are standardised within them", check=">=2"
    )
    minibatch: int = option(16, "answers per gradient step", check=">=1")
    grpo_epochs: int = option(1, "passes over each iteration's answers (μ)", check=">=1")
    lr: float = option(1e-5, "learning rate (AdamW)", check=">0")
    beta: float = option(
        0.04, "weight of the k3 KL estimate to the reference in the loss", check=">=0"
    )
    loss_type: str = option(
        "grpo",
        "grpo (each answer's token mean, then the mean over answers) | bnpo (mean over the "
        "batch's tokens) | dr-grpo (sum over answers x --max-new-tokens, Dr GRPO) | dapo (sum "
        "over the iteration's tokens per update, DAPO); TRL's default is dapo",
    )
    scale_rewards: str = option(
        "group",
        "divide the advantages by the std of the group | batch | none (Dr GRPO: none)",
    )
    epsilon_high: float = option(
        0.0, "upper clip range of the ratio (DAPO's clip-higher, e.g. 0.28; 0: --clip)", check=">=0"
    )
    importance_sampling: str = option(
        "token",
        "token (one ratio per token) | sequence (GSPO: one per answer, exp of its mean log-ratio)",
    )
    skip_flat_groups: bool = option(
        False,
        "leave the groups whose rewards are all equal (zero advantage) out of the update (DAPO's "
        "dynamic sampling, without drawing more prompts)",
    )


ScoreFn = Callable[[Any, list[int]], torch.Tensor]  # (rollout, prompt indices) -> rewards


class GRPOTrainer:
    """Optimises `policy` against `score(rollout, prompt indices)`; the reference is a frozen
    copy of the starting policy (of an adapted one, the policy with its adapters off)."""

    def __init__(self, policy: nn.Module, tokenizer: Any, config: Options, fabric: Any = None):
        import lightning as L

        self.config = config
        self.tokenizer = tokenizer
        self.fabric = fabric or L.Fabric(accelerator="cpu", devices=1)
        if config.skip_flat_groups and self.fabric.world_size > 1:  # unequal update counts
            raise SelfsupError(
                "--skip-flat-groups trains in one process: with several, each would take its own "
                "number of updates; leave it out, or run with --devices 1"
            )
        self.reference = lora.reference(policy) or self.fabric.to_device(
            copy.deepcopy(policy).eval().requires_grad_(False)
        )
        disable_dropout(policy)  # ratios compare two passes over the same answer
        trained = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters
        optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
        self.policy = policy  # sampling and saving; training passes go through self.model
        self.model, self.optimizer = self.fabric.setup(policy, optimizer)

    def step(
        self, conversations: Sequence[Sequence[Message]], indices: Sequence[int], seed: int,
        score: ScoreFn,
    ) -> dict[str, float]:  # fmt: skip
        """One iteration on these prompts (each answered G times); returns what to log."""
        c = self.config
        g = c.group_size
        minibatch = c.minibatch // self.fabric.world_size  # of several processes: its share
        grouped = [conv for conv in conversations for _ in range(g)]
        prompt_of = [i for i in indices for _ in range(g)]
        self.policy.eval()
        with torch.no_grad():
            policy = lora.sampled(self.policy)  # adapters on: merged once per round
            r = sample(policy, self.tokenizer, grouped, c.max_new_tokens, c.temperature, 0, seed)
            r = rollout_to(r, self.fabric.device)
            rewards = score(r, prompt_of).to(self.fabric.device)
            advantages = group_advantages(rewards, g, scale=c.scale_rewards)
            flat = flat_groups(rewards, g)
            kept = (~flat if c.skip_flat_groups else torch.ones_like(flat)).repeat_interleave(g)
            # one update per batch: the sampling policy is the one being updated, so its
            # log-probabilities come from the training pass itself (as TRL does)
            one_update = c.grpo_epochs == 1 and minibatch >= len(grouped) and bool(kept.all())
            old = None if one_update else forward_response(policy, r)[1]
            _, ref, _ = forward_response(self.reference, r)
        mask = r.response_mask.float()
        order = torch.randperm(len(grouped), generator=torch.Generator().manual_seed(seed))
        order = order[kept.cpu()[order]]  # --skip-flat-groups: only the groups that spread
        batches = -(-len(order) // minibatch)  # updates per epoch
        tokens = mask[order.to(mask.device)].sum().item() / max(batches, 1)  # dapo's normaliser
        stats: dict[str, list[float]] = {"loss": [], "k3": [], "clip": []}
        fill = old is None  # one update: the training pass gives them
        old = torch.empty_like(ref) if old is None else old
        for _ in range(c.grpo_epochs if len(order) else 0):
            for idx in order.split(minibatch):
                idx = idx.to(self.fabric.device)
                parts = [p for p in idx.tensor_split(c.accumulate) if len(p)]  # --accumulate
                weights = micro_weights(c.loss_type, [mask[p] for p in parts])
                self.optimizer.zero_grad(set_to_none=True)
                sums = dict.fromkeys(stats, 0.0)
                for j, (p, w) in enumerate(zip(parts, weights, strict=True)):
                    with self.fabric.no_backward_sync(self.model, enabled=j < len(parts) - 1):
                        _, logprobs, _ = forward_response(self.model, select_rollouts(r, p))
                        if fill:
                            old[p] = logprobs.detach()
                        loss, s = grpo_loss(
                            logprobs, old[p], ref[p], advantages[p], mask[p], c.clip, c.beta,
                            loss_type=c.loss_type, clip_high=c.epsilon_high or None,
                            importance=c.importance_sampling, max_tokens=c.max_new_tokens,
                            tokens=tokens,
                        )  # fmt: skip
                        self.fabric.backward(loss * w)
                    sums["loss"] += loss.item() * w
                    sums["k3"] += s["k3"].item() * len(p) / len(idx)  # a mean over answers
                    sums["clip"] += (s["clip"] * mask[p].sum() / mask[idx].sum()).item()
                self.fabric.clip_gradients(self.model, self.optimizer, max_norm=c.max_grad_norm)
                self.optimizer.step()
                for k, v in sums.items():
                    stats[k].append(v)
        return {
            **{f"grpo/{k}": float(np.mean(v)) if v else 0.0 for k, v in stats.items()},
            "reward": rewards.nanmean().item(),
            "reward_std": nanstd(rewards.reshape(-1, g), 1).nanmean().item(),
            "flat_groups": flat.float().mean().item(),
            "kl": kl_to_reference(old, ref, mask).mean().item(),
            "answer_tokens": mask.sum(1).mean().item(),
            "ended": r.ended.float().mean().item(),
        }


CHOICES = {
    "reward_from": ("model", "gold"),
    "loss_type": losses.LOSS_TYPES,
    "scale_rewards": losses.SCALES,
    "importance_sampling": losses.IMPORTANCE,
}


def micro_weights(loss_type: str, masks: Sequence[torch.Tensor]) -> list[float]:
    """The weight of each micro-batch's `grpo_loss` (answer masks `masks`) in the loss of their
    whole minibatch (--accumulate): its part of the answers (grpo, dr-grpo: per-answer means
    or a normaliser per answer), of the tokens (bnpo), or 1 (dapo: one normaliser for all)."""
    if loss_type == "dapo":
        return [1.0 for _ in masks]
    if loss_type == "bnpo":
        tokens = [m.sum().item() for m in masks]
        return [t / max(sum(tokens), 1.0) for t in tokens]
    return [len(m) / sum(map(len, masks)) for m in masks]


def check_options(config: Options) -> None:
    """One line for a missing or impossible option, before any file is read or written."""
    check_declared(config)  # required, and the ranges its fields declare
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            flag = "--" + name.replace("_", "-")
            raise SelfsupError(
                f"{flag} {getattr(config, name)!r}: expected one of {' | '.join(choices)}"
            )
    if config.reward_from == "gold" and config.gold == "none":
        raise SelfsupError("--reward-from gold needs a gold score: --gold arithmetic")
    if config.reward_from == "model" and not config.reward and not config.reward_fn.strip():
        raise SelfsupError(
            "--reward is required: a reward-model run, unless --reward-fn FILE.py:NAME scores "
            "the answers (or --reward-from gold)"
        )
    check_accumulate(config)  # of several processes, their shares too (check_shares)
    hf.check_accelerator(config.accelerator)
    hf.check_precision(config.precision)
    check_devices(config.accelerator, config.devices)
    lora.check(config)


def grpo(config: Options, command: str | None = None) -> Path:
    """GRPO from the SFT model; returns the run directory."""
    check_options(config)
    rewards = Rewards(config, rw.load_reward_fns(config.reward_fn))
    stage = OnlineStage(
        "GRPO", "grpo", config.prompts_per_iteration, ("grpo/loss", "reward", "kl"),
        lambda inputs, fabric: GRPOTrainer(inputs.policy, inputs.tokenizer, config, fabric),
        lambda trainer, inputs, idx, seed: {
            **trainer.step(
                [inputs.conversations[i] for i in idx], idx, seed, rewards.scorer(inputs)
            ),
            **rewards.last,
        },
        proxy=rewards.held_out,
    )  # fmt: skip
    return run_online(config, command, stage)


class Rewards:
    """What scores a run's answers: the reward model (--reward-from model, when --reward is
    given; --no-end-score where an answer does not end) or the gold score (--reward-from gold),
    then each --reward-fn, summed with --reward-weights (None skipped; NaN where nothing
    scored). A function's failure stops the run in one line naming it, the iteration and the
    first bad value; the run keeps the policies it saved."""

    def __init__(self, config: Options, fns: list[rw.RewardFn]):
        self.config, self.fns = config, fns
        self.source = "gold" if config.reward_from == "gold" else "model" if config.reward else ""
        self.weights = rw.reward_weights(config.reward_weights, len(fns) + bool(self.source))
        names = [f"reward/{f.name}" for f in fns]  # the metrics.csv columns of their means
        self.names = [
            n if names.count(n) == 1 else f"reward/{f.spec}"
            for n, f in zip(names, fns, strict=True)
        ]
        self.iteration = 0  # training calls so far: the iteration being scored
        self.last: dict[str, float] = {}  # the per-function means of the last iteration
        self._prompts: dict[bool, tuple[list[Any], list[bool], dict[str, list[Any]]]] = {}

    def held_out(self, inputs: Inputs) -> ScoreFn | None:
        """The held-out proxy: what training optimises, or (None) the reward model's where
        there is one and no function."""
        if not self.fns and inputs.reward_model is not None:
            return None
        return self.scorer(inputs, held_out=True)

    def _trl_inputs(self, held_out: bool) -> tuple[list[Any], list[bool], dict[str, list[Any]]]:
        if held_out not in self._prompts:
            c = self.config
            path = (c.eval_prompts or c.prompts) if held_out else c.prompts
            conversations, records = load_prompts(path)
            if held_out:
                conversations, records = conversations[: c.eval_samples], records[: c.eval_samples]
            self._prompts[held_out] = rw.trl_inputs(records, conversations)
        return self._prompts[held_out]

    def scorer(self, inputs: Inputs, held_out: bool = False) -> ScoreFn:
        """(rollout, prompt indices) -> the answers' rewards, of the training prompts or (with
        `held_out`) of the evaluation's."""
        gold = inputs.eval_gold if held_out else inputs.gold

        def score(rollout: Any, prompt_of: list[int]) -> torch.Tensor:
            if not held_out:
                self.iteration += 1
            columns: list[torch.Tensor] = []
            answers = decode_responses(inputs.tokenizer, rollout)
            if self.source == "gold":
                assert gold is not None
                scores = [gold(i, a) for i, a in zip(prompt_of, answers, strict=True)]
                columns.append(torch.tensor(scores, dtype=torch.float32))
            elif self.source == "model":
                s = reward_scores(inputs.reward_model, rollout).float().cpu()
                columns.append(torch.where(rollout.ended.cpu(), s, self.config.no_end_score))
            own = self._functions(rollout, prompt_of, answers, held_out) if self.fns else []
            rewards = rw.combine(torch.stack(columns + own, 1), self.weights)
            if own and not held_out:
                self.last = {n: v.nanmean().item() for n, v in zip(self.names, own, strict=True)}
                self.last["unscored"] = rewards.isnan().float().mean().item()
            return rewards

        return score

    def _functions(
        self, rollout: Any, prompt_of: list[int], answers: list[str], held_out: bool
    ) -> list[torch.Tensor]:
        prompts, conversational, columns = self._trl_inputs(held_out)
        ids = [
            row[m.bool()].tolist()
            for row, m in zip(rollout.responses, rollout.response_mask, strict=True)
        ]
        args = (
            [prompts[i] for i in prompt_of], answers, [conversational[i] for i in prompt_of], ids,
            {k: [v[i] for i in prompt_of] for k, v in columns.items()},
        )  # fmt: skip
        try:
            out = [rw.call_reward_fn(fn, *args) for fn in self.fns]
            if not self.source and torch.stack(out, 1).isnan().all():
                raise rw.RewardFnError(
                    f"every reward function returned None for all {len(answers)} answers (None "
                    "is no opinion: at least one must score an answer)"
                )
        except rw.RewardFnError as e:
            where = "the held-out evaluation at " if held_out else ""
            note = saved_note(self.config.out)
            raise SelfsupError(
                f"GRPO stopped at {where}iteration {self.iteration}: {e}; {note}"
            ) from None
        return out


def saved_note(out: str) -> str:
    """The last policy a run saved (what a stop keeps), or that its folder goes."""
    saved = sorted(Path(out).glob("iter[0-9]*"))
    if saved:
        return f"the last saved policy is {saved[-1]} (selfsup lm chat {saved[-1]})"
    return f"no policy was saved yet: {out} is removed"


class GRPO(Stage):
    Options = Options
    help = "optimise an SFT model with GRPO: group-relative advantages, no value model"
    description = (
        "GRPO (Shao et al., 2024): G answers per prompt, rewards standardised within each group "
        "(from a reward model, the gold score and/or reward functions written as TRL's), "
        "clipped ratio, k3 KL to the SFT model in the loss; Dr GRPO, DAPO and GSPO variants. "
        "Writes a run directory."
    )
    entry = "grpo"

    summary = staticmethod(policy_summary)
