"""GRPO (Shao et al., 2024): `selfsup lm grpo`.

One iteration: draw a few prompts, sample G answers to each from the policy, score them (the
reward model, or the gold score for analysis), standardise the rewards within each group into
advantages, and take clipped-ratio steps with the k3 estimate of the KL from the frozen SFT
model as a loss term. No value model. The loop, sampling, scoring and held-out evaluation are
those of the PPO stage (`online.run_online`, `rollout`), so the two are measured alike.
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
from selfsup.lm.alignment.online import Inputs, OnlineStage, run_online
from selfsup.lm.alignment.ppo import disable_dropout, kl_to_reference, rollout_to, select_rollouts
from selfsup.lm.alignment.rollout import decode_responses, forward_response, reward_scores, sample
from selfsup.lm.alignment.stage import Stage, policy_summary
from selfsup.lm.data.conversations import Message
from selfsup.lm.losses.grpo import group_advantages, grpo_loss
from selfsup.lm.models import hf, lora
from selfsup.lm.options import OnlineOptions, OnlinePolicy, check_declared, check_one_device


@dataclass
class Options(OnlineOptions, OnlinePolicy):
    """Options of `selfsup lm grpo` (defaults after DeepSeekMath's GRPO, scaled down)."""

    reward_from: str = option(
        "model",
        "what the answers are scored by: model (the reward model) | gold (the known gold score "
        "itself: for analysis only, needs --gold)",
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


ScoreFn = Callable[[Any, list[int]], torch.Tensor]  # (rollout, prompt indices) -> rewards


class GRPOTrainer:
    """Optimises `policy` against `score(rollout, prompt indices)`; the reference is a frozen
    copy of the starting policy (of an adapted one, the policy with its adapters off)."""

    def __init__(self, policy: nn.Module, tokenizer: Any, config: Options, fabric: Any = None):
        import lightning as L

        self.config = config
        self.tokenizer = tokenizer
        self.fabric = fabric or L.Fabric(accelerator="cpu", devices=1)
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
        grouped = [conv for conv in conversations for _ in range(g)]
        prompt_of = [i for i in indices for _ in range(g)]
        self.policy.eval()
        with torch.no_grad():
            policy = lora.sampled(self.policy)  # adapters on, not the lean forward
            r = sample(policy, self.tokenizer, grouped, c.max_new_tokens, c.temperature, 0, seed)
            r = rollout_to(r, self.fabric.device)
            rewards = score(r, prompt_of).to(self.fabric.device)
            advantages = group_advantages(rewards, g)
            # one update per batch: the sampling policy is the one being updated, so its
            # log-probabilities come from the training pass itself (as TRL does)
            one_update = c.grpo_epochs == 1 and c.minibatch >= len(grouped)
            old = None if one_update else forward_response(policy, r)[1]
            _, ref, _ = forward_response(self.reference, r)
        mask = r.response_mask.float()
        stats: dict[str, list[float]] = {"loss": [], "k3": [], "clip": []}
        generator = torch.Generator().manual_seed(seed)
        for _ in range(c.grpo_epochs):
            for idx in torch.randperm(len(grouped), generator=generator).split(c.minibatch):
                idx = idx.to(self.fabric.device)
                part = select_rollouts(r, idx)
                _, logprobs, _ = forward_response(self.model, part)
                if old is None:
                    old = torch.empty_like(ref)
                    old[idx] = logprobs.detach()
                loss, s = grpo_loss(
                    logprobs, old[idx], ref[idx], advantages[idx], mask[idx], c.clip, c.beta
                )
                self.optimizer.zero_grad(set_to_none=True)
                self.fabric.backward(loss)
                self.fabric.clip_gradients(self.model, self.optimizer, max_norm=c.max_grad_norm)
                self.optimizer.step()
                stats["loss"].append(loss.item())
                stats["k3"].append(s["k3"].item())
                stats["clip"].append(s["clip"].item())
        assert old is not None
        return {
            **{f"grpo/{k}": float(np.mean(v)) for k, v in stats.items()},
            "reward": rewards.mean().item(),
            "reward_std": rewards.reshape(-1, g).std(1).mean().item(),
            "kl": kl_to_reference(old, ref, mask).mean().item(),
            "answer_tokens": mask.sum(1).mean().item(),
            "ended": r.ended.float().mean().item(),
        }


def check_options(config: Options) -> None:
    """One line for a missing or impossible option, before any file is read or written."""
    check_declared(config)  # required, and the ranges its fields declare
    if config.reward_from not in ("model", "gold"):
        raise SelfsupError(f"--reward-from {config.reward_from!r}: expected model or gold")
    if config.reward_from == "gold" and config.gold == "none":
        raise SelfsupError("--reward-from gold needs a gold score: --gold arithmetic")
    hf.check_accelerator(config.accelerator)
    hf.check_precision(config.precision)
    check_one_device(config.devices)
    lora.check(config)


def grpo(config: Options, command: str | None = None) -> Path:
    """GRPO from the SFT model; returns the run directory."""
    check_options(config)
    stage = OnlineStage(
        "GRPO", "grpo", config.prompts_per_iteration, ("grpo/loss", "reward", "kl"),
        lambda inputs, fabric: GRPOTrainer(inputs.policy, inputs.tokenizer, config, fabric),
        lambda trainer, inputs, idx, seed: trainer.step(
            [inputs.conversations[i] for i in idx], idx, seed, scorer(config, inputs)
        ),
    )  # fmt: skip
    return run_online(config, command, stage)


def scorer(config: Options, inputs: Inputs) -> ScoreFn:
    """The rewards of the answers: the reward model's (--no-end-score where an answer does not
    end), or with --reward-from gold the gold score itself."""
    gold, reward_model = inputs.gold, inputs.reward_model

    def score(rollout: Any, prompt_of: list[int]) -> torch.Tensor:
        if config.reward_from == "gold":
            answers = decode_responses(inputs.tokenizer, rollout)
            assert gold is not None
            return torch.tensor([gold(i, a) for i, a in zip(prompt_of, answers, strict=True)])
        s = reward_scores(reward_model, rollout)
        return torch.where(rollout.ended, s, torch.full_like(s, config.no_end_score))

    return score


class GRPO(Stage):
    Options = Options
    help = "optimise an SFT model with GRPO: group-relative advantages, no value model"
    description = (
        "GRPO (Shao et al., 2024): G answers per prompt, rewards standardised within each group, "
        "clipped ratio, k3 KL to the SFT model in the loss. Writes a run directory."
    )
    entry = "grpo"

    summary = staticmethod(policy_summary)
