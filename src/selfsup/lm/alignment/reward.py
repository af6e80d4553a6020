"""The reward model (`selfsup lm reward`): the transformer with a scalar head, initialised
from the SFT model, trained on rankings with -log σ(r_w - r_l) over every strictly ordered pair
of a prompt, the pairs of one prompt in one batch element (InstructGPT), in posttrain's loop.
Reports held-out pairwise accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.stage import EpochStage
from selfsup.lm.data.chat_data import ranking_batch
from selfsup.lm.data.conversations import Ranking, read_rankings
from selfsup.lm.losses.preference import pair_agreement, pairwise_accuracy, pairwise_ranking_loss
from selfsup.lm.models import lora
from selfsup.lm.options import TuneConfig as Options
from selfsup.lm.training import posttrain


def train_reward(config: Options, command: str | None = None) -> Path:
    """Reward model from rankings; returns the run directory."""
    from transformers import AutoModelForSequenceClassification

    config = posttrain.checked_config(config)
    torch.manual_seed(config.seed)  # the new score head and dropout masks
    rankings = read_rankings(config.data)
    ordered = [r for r in rankings if len(r.tiers) > 1]
    if len(ordered) < len(rankings):  # e.g. K identical answers that the labeler tied
        print(
            f"{config.data}: {len(rankings) - len(ordered)} of {len(rankings)} ranked prompts "
            "are full ties (no strictly ordered pair) and are left out"
        )
    if not ordered:
        raise SelfsupError(f"{config.data}: every ranking is a full tie: nothing to learn from")
    rankings = ordered
    tokenizer, model = lora.load_tokenizer_and(
        config.init, AutoModelForSequenceClassification, num_labels=1
    )
    posttrain.prepare_chat(model, tokenizer)
    posttrain.check_rankings_fit(tokenizer, rankings, config, model)
    train, val = posttrain.split_validation(rankings, config.val_fraction, "ranked prompts")

    def loss_fn(m: Any, batch: list) -> tuple[torch.Tensor, dict[str, float]]:
        b = ranking_batch(tokenizer, batch, config.max_length)
        device = posttrain.device_of(m)
        rewards = posttrain.reward_of(m, b["input_ids"].to(device), b["attention_mask"].to(device))
        pairs, prompts = b["pairs"].to(rewards.device), b["prompt_of_pair"].to(rewards.device)
        loss = pairwise_ranking_loss(rewards, pairs, prompts)
        return loss, {"pair_acc": pairwise_accuracy(rewards.detach(), pairs)}

    ceiling = gold_ceiling(val)
    extra = {} if ceiling is None else {"val_gold_ceiling": ceiling}
    return posttrain.fit_stage(
        "reward", config, command, model, tokenizer, train, val, loss_fn, extra
    )


def gold_ceiling(rankings: Sequence[Ranking]) -> float | None:
    """The pair accuracy of the labelers' true (gold) scores on these rankings, ties counting
    half: no reward model can expect more from noisy labels. None without gold scores."""
    if not rankings or any(r.gold is None for r in rankings):
        return None
    credit, pairs = 0.0, 0
    for r in rankings:
        c, n = pair_agreement(r.tiers, r.gold)  # type: ignore[arg-type]
        credit, pairs = credit + c, pairs + n
    return credit / max(1, pairs)


class Reward(EpochStage):
    Options = Options
    help = "train a reward model from rankings like 'D > C > A = B'"
    description = (
        "train a reward model from rankings like 'D > C > A = B'; writes a run directory "
        "(training counted in --epochs)."
    )
    entry = "train_reward"
    shown = ("val_pair_acc", "val_loss", "train_loss")
    after = "selfsup lm rlhf --policy SFT_RUN --reward {run} --prompts P.jsonl --out OUT"
