"""SimPO, simple preference optimisation (Meng et al., 2024): `selfsup lm simpo`.

DPO without a reference model: the implicit reward of an answer is its length-normalised
log-probability, r = β·log π(y|x)/|y| (|y| the answer's tokens, its end marker included), and
every preference pair adds -log σ(r_chosen - r_rejected - γ), γ a target reward margin. The
pairs, the policy and the loop (`dpo.fit_pairs`: epochs, validation, checkpoints, RUN/hf) are
DPO's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.dpo import DPO, fit_pairs
from selfsup.lm.alignment.dpo import Options as DPOOptions
from selfsup.lm.data.chat_data import IGNORE


@dataclass
class Options(DPOOptions):
    """Options of `selfsup lm simpo`: DPO's, with SimPO's β and γ (no reference model)."""

    init: str = option(
        "",
        "the SFT run (or local HF folder) to start from (required unless --resume RUN)",
    )
    beta: float = option(
        2.0,
        "the reward scale: reward β·log π(y|x)/|y|, the answer's mean log-probability per token",
        check=">0",
    )
    gamma: float = option(
        1.0, "the target reward margin γ between chosen and rejected (reward units)", check=">=0"
    )


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, chosen rewards, rejected rewards) of P pairs: the mean of -log σ(r_c - r_r - γ)
    with r = β·logp/|y|, logp an answer's summed log-probability and |y| its tokens summed.
    γ is in reward units (not divided by β); TRL's CPOTrainer gives this loss with
    loss_type="simpo", simpo_gamma=γ and cpo_alpha=0. The rewards are returned detached."""
    if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
        raise SelfsupError("SimPO needs every answer's length (tokens scored) to be at least 1")
    chosen = beta * policy_chosen / chosen_lengths
    rejected = beta * policy_rejected / rejected_lengths
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, chosen.detach(), rejected.detach()


class SimPO(DPO):
    Options = Options
    help = "SimPO: preference pairs, length-normalised rewards and a margin, no reference model"
    description = (
        "SimPO (Meng et al., 2024): as DPO, but the implicit reward is the answer's mean "
        "log-probability per token times β, pairs must be ordered by a margin γ, and there is "
        "no reference model. Writes a run directory (training counted in --epochs)."
    )
    entry = "simpo"
    # summary: DPO's closing lines


def simpo(config: Options, command: str | None = None) -> Path:
    """SimPO from the SFT model on preference pairs; returns the run directory."""

    def pair_loss(c: Options, chosen: Tensor, rejected: Tensor, batch: list) -> Any:
        lengths = torch.tensor(  # the answers' scored tokens (labels after the first position)
            [[sum(t != IGNORE for t in side[1][1:]) for side in pair] for pair in batch],
            device=chosen.device,
            dtype=chosen.dtype,
        )
        return simpo_loss(chosen, rejected, lengths[:, 0], lengths[:, 1], c.beta, c.gamma)

    return fit_pairs("simpo", config, command, pair_loss, reference=False)
