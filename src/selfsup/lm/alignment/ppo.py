"""RLHF with PPO (InstructGPT's third stage) on any Hugging Face causal LM.

One iteration: sample an answer to each of B prompts from the policy, score every conversation
with the reward model, charge each answer token β·(log π - log π_ref) against a frozen copy of
the starting (SFT) model, turn that into per-token advantages with GAE, then run several epochs
of clipped-surrogate updates of the policy and clipped updates of a value head. Answers that do
not end within the token budget get a fixed score (a penalty) instead of the reward model's.
`--accumulate K` takes each update in K micro-batches, one optimiser step on their gradients
(each weighed by its part of the minibatch's tokens: the same update, less memory).

Lightning Fabric runs the loop (devices, precision, several processes); the maths are the pure
functions of `selfsup.lm.losses.ppo`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from selfsup.engine.distributed import mean_over_processes, sum_over_processes
from selfsup.lm.alignment.rollout import (
    Rollout,
    decode_responses,
    forward_response,
    reward_scores,
    sample,
)
from selfsup.lm.data.conversations import Message
from selfsup.lm.losses.ppo import (
    entropy,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)
from selfsup.lm.models import lora
from selfsup.lm.options import PPOSettings

GoldFn = Callable[[int, str], float]  # (prompt index, answer text) -> gold score


def adaptive_beta(beta: float, kl: float, target: float, answers: int, horizon: int) -> float:
    """The KL coefficient after one batch of `answers` rollouts with mean KL `kl` (TRL's
    AdaptiveKLController; Ziegler et al. 2019):
    β·(1 + clip(kl/target - 1, ±0.2)·answers/horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * answers / horizon)


class ValueHead(nn.Module):
    """A scalar estimate of the return from the policy's last hidden state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h.to(self.linear.weight.dtype))


class PolicyWithValue(nn.Module):
    """The policy LM and its value head as one module (one optimizer, one Fabric setup)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = ValueHead(lm.config.hidden_size)

    def forward(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        logits, logprobs, values = forward_response(self.lm, rollout, self.value_head)
        assert values is not None
        return logits, logprobs, values


@dataclass
class Experience:
    """A batch of rollouts with everything PPO needs, computed once before the updates."""

    rollout: Rollout
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor
    kl: Tensor  # per-sequence sum of log π - log π_ref over the answer


def kl_to_reference(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-answer Monte-Carlo estimate of KL(π || π_ref): the sum over its tokens of log ratios."""
    return ((logprobs - ref_logprobs) * mask).sum(1)


class PPOTrainer:
    """Optimises `policy` (a causal LM) against `reward_model` (a sequence-scoring LM)."""

    def __init__(
        self,
        policy: nn.Module,
        reward_model: nn.Module,
        tokenizer: Any,
        settings: PPOSettings,
        fabric: Any = None,
    ) -> None:
        import lightning as L

        self.settings = settings
        self.beta = settings.beta  # the KL coefficient now (it moves with --adaptive-kl)
        self.tokenizer = tokenizer
        self.fabric = fabric or L.Fabric(accelerator="cpu", devices=1)
        frozen = lora.reference(policy)  # an adapted policy's: itself with its adapters off
        self.reference = frozen or copy.deepcopy(policy).eval().requires_grad_(False)
        self.reward_model = reward_model.eval().requires_grad_(False)
        model = PolicyWithValue(policy)
        trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: adapters, value
        optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
        self.model, self.optimizer = self.fabric.setup(model, optimizer)
        if frozen is None:
            self.reference = self.fabric.to_device(self.reference)
        self.reward_model = self.fabric.to_device(self.reward_model)

    @property
    def policy(self) -> nn.Module:
        return self.model.lm

    @torch.no_grad()
    def experience(self, conversations: Sequence[Sequence[Message]], seed: int) -> Experience:
        s = self.settings
        self.model.eval()
        rollout = sample(  # an adapted policy with its adapters on, not the lean forward
            lora.sampled(self.policy), self.tokenizer, conversations, s.max_new_tokens,
            s.temperature, 0, seed,
        )  # fmt: skip
        rollout = rollout_to(rollout, self.fabric.device)
        _, logprobs, values = self.model(rollout)
        _, ref_logprobs, _ = forward_response(self.reference, rollout)
        scores = reward_scores(self.reward_model, rollout)
        scores = torch.where(rollout.ended, scores, torch.full_like(scores, s.no_end_score))
        mask = rollout.response_mask.float()
        rewards, _ = shaped_rewards(scores, logprobs, ref_logprobs, mask, self.beta)
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
        advantages = masked_whiten(advantages, mask, total=sum_over_processes)  # whole batch's
        kl = kl_to_reference(logprobs, ref_logprobs, mask)
        return Experience(rollout, logprobs, values, advantages, returns, scores, kl)

    def update(self, exp: Experience, seed: int) -> dict[str, float]:
        """Several epochs of minibatch PPO updates; returns the mean statistics. With
        `target_kl`, the first minibatch whose approximate KL from the rollouts' policy exceeds
        it is not applied and the iteration's updates end (`ppo/updates` counts those made).
        Of several processes each takes --minibatch / N of its share's answers a step and
        weighs its token means by its part of the minibatch's tokens (the advantages are
        whitened over the whole batch too), so that N processes train as one process with the
        whole batch when --minibatch is --rollouts (smaller minibatches: each process draws its
        own from its share). --accumulate K cuts each minibatch into K micro-batches weighed
        the same way, their gradients added up before one optimiser step: the update of the
        whole minibatch (the target-KL test on its whole KL, after their backward passes)."""
        s = self.settings
        self.model.train()
        disable_dropout(self.model)
        g = torch.Generator().manual_seed(seed)
        n = exp.rollout.sequences.shape[0]
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy", "value", "clip", "approx_kl", "entropy")
        }
        updates = 0
        batches = [
            idx
            for _ in range(s.ppo_epochs)
            for idx in torch.randperm(n, generator=g).split(s.minibatch // self.fabric.world_size)
        ]
        for idx in batches:
            idx = idx.to(self.fabric.device)
            parts = [p for p in idx.tensor_split(s.accumulate) if len(p)]  # --accumulate
            masks = [exp.rollout.response_mask[p].float() for p in parts]
            sums = dict.fromkeys(stats, 0.0)
            self.optimizer.zero_grad(set_to_none=True)
            for j, (p, mask, weight) in enumerate(
                zip(parts, masks, self._token_weights(masks), strict=True)
            ):  # token means: the whole minibatch's (of every process)
                with self.fabric.no_backward_sync(self.model, enabled=j < len(parts) - 1):
                    logits, logprobs, values = self.model(select_rollouts(exp.rollout, p))
                    pg, clip_fraction, approx_kl = policy_loss(
                        logprobs, exp.logprobs[p], exp.advantages[p], mask, s.clip
                    )
                    vf = value_loss(values, exp.values[p], exp.returns[p], mask, s.value_clip)
                    self.fabric.backward((pg + s.value_coef * vf) * weight)
                with torch.no_grad():
                    terms = (pg, vf, clip_fraction, approx_kl, entropy(logits, mask))
                    for k, v in zip(sums, terms, strict=True):
                        sums[k] += (v * weight).item()
            if s.target_kl > 0:  # every process stops at the same minibatch, unapplied
                kl = mean_over_processes({"kl": sums["approx_kl"]}, self.fabric.device)["kl"]
                if kl > s.target_kl:
                    self.optimizer.zero_grad(set_to_none=True)
                    break
            self.fabric.clip_gradients(self.model, self.optimizer, max_norm=s.max_grad_norm)
            self.optimizer.step()
            updates += 1
            for k, v in sums.items():
                stats[k].append(v)
        return {**{f"ppo/{k}": float(np.mean(v)) for k, v in stats.items()}, "ppo/updates": updates}

    def _token_weights(self, masks: Sequence[Tensor]) -> list[float]:
        """Each micro-batch's part of a minibatch's answer tokens (`masks`: this process's
        micro-batches; of several processes, of all their tokens), times the processes (DDP
        averages the gradients): a micro-batch's token mean times it is its term of the whole
        minibatch's token mean. [1.0] for the whole minibatch in one process."""
        world = self.fabric.world_size
        if world == 1 and len(masks) == 1:
            return [1.0]
        tokens = [m.sum().item() for m in masks]
        total = sum(tokens)
        if world > 1:
            total = sum_over_processes(torch.tensor(total, device=self.fabric.device)).item()
        return [world * t / max(total, 1.0) for t in tokens]

    def step(
        self, conversations: Sequence[Sequence[Message]], seed: int, gold: GoldFn | None = None
    ) -> dict[str, float]:
        """One PPO iteration on these prompts: sample, score, update; returns what to log."""
        exp = self.experience(conversations, seed)
        stats = self.update(exp, seed)
        mask = exp.rollout.response_mask.float()
        s = self.settings
        value_mean = masked_mean(exp.values, mask) * self._token_weights([mask])[0]
        stats.update(
            {
                "beta": self.beta,
                "reward": exp.scores.mean().item(),
                "kl": exp.kl.mean().item(),
                "answer_tokens": mask.sum(1).mean().item(),
                "ended": exp.rollout.ended.float().mean().item(),
                "value_mean": float(value_mean),
            }
        )
        if s.adaptive_kl > 0:  # on the processes' mean KL: one β for all
            stats["kl"] = mean_over_processes({"kl": stats["kl"]}, self.fabric.device)["kl"]
            self.beta = adaptive_beta(
                self.beta, stats["kl"], s.adaptive_kl, len(conversations), s.kl_horizon
            )
        if gold is not None:
            answers = decode_responses(self.tokenizer, exp.rollout)
            stats["gold"] = float(np.mean([gold(i, a) for i, a in enumerate(answers)]))
        return stats


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratios compare two forward passes of the same answer: dropout would make them
    differ even before any update."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def select_rollouts(rollout: Rollout, idx: Tensor) -> Rollout:
    """The rollouts at rows `idx` (a minibatch)."""
    return Rollout(
        rollout.sequences[idx],
        rollout.attention_mask[idx],
        rollout.prompt_length,
        rollout.response_mask[idx],
        rollout.ended[idx],
        rollout.suppressed,
        rollout.temperature,
    )


def rollout_to(rollout: Rollout, device: torch.device) -> Rollout:
    """The rollouts' tensors on `device`."""
    return Rollout(
        rollout.sequences.to(device),
        rollout.attention_mask.to(device),
        rollout.prompt_length,
        rollout.response_mask.to(device),
        rollout.ended.to(device),
        rollout.suppressed,
        rollout.temperature,
    )
