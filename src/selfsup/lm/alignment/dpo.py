"""Direct preference optimisation (Rafailov et al., 2023): `selfsup lm dpo`.

The policy starts from the SFT model, which stays frozen as the reference; every preference
pair (prompt, chosen, rejected) adds -log σ(β·((log π_c - log ref_c) - (log π_r - log ref_r))),
the log-probabilities summed over the answer's tokens (its end marker included). The reference's
log-probabilities are computed once, before training. Pairs come from the same rankings the
reward model reads (every strictly ordered pair of a prompt) or from TRL's chosen/rejected
records; the loop (epochs, validation, checkpoints, RUN/hf) is `posttrain.fit_stage`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.ppo import disable_dropout
from selfsup.lm.alignment.stage import EpochStage
from selfsup.lm.data.chat_data import IGNORE, collate, sft_example
from selfsup.lm.data.conversations import Message, Ranking, read_rankings
from selfsup.lm.losses.ppo import token_logprobs
from selfsup.lm.losses.preference import dpo_loss, ranking_pairs
from selfsup.lm.models import lora
from selfsup.lm.options import TuneConfig
from selfsup.lm.training.posttrain import (
    check_rankings_fit,
    checked_config,
    fit_stage,
    set_special_ids,
    split_validation,
)


@dataclass
class Options(TuneConfig):
    """Options of `selfsup lm dpo`: TuneConfig's loop, its own defaults, and β."""

    init: str = option(
        "",
        "the SFT run (or local HF folder) to start from; also the frozen reference (required "
        "unless --resume RUN)",
    )
    data: str = option(
        "",
        "JSONL rankings ('D > C > A = B': every strictly ordered pair) or TRL's chosen/rejected "
        "records, text or conversational (required unless --resume RUN)",
    )
    epochs: int = option(1, "passes over the pairs", check=">=1")
    batch_size: int = option(16, "preference pairs per step", check=">=1")
    lr: float = option(1e-5, "peak learning rate (AdamW, warm-up then cosine)", check=">0")
    max_length: int = option(
        128,
        "tokens per conversation: longer ones are cut (they lose their start); a conversation "
        "beyond the model's context stops the command with one line naming its line (pass "
        "--max-length CONTEXT to cut there)",
        check=">=1",
    )
    pack: bool = option(False, "not used by dpo", cli=False)
    resume: str | None = option(
        None, "continue the run in this directory from its last epoch (True: the one in --out)"
    )
    beta: float = option(
        0.1,
        "the KL strength: implicit reward β·(log π - log π_ref); smaller β strays further",
        check=">0",
    )


Pair = tuple[list[Message], str, str]  # (the prompt's conversation, chosen, rejected)


def preference_pairs(rankings: Sequence[Ranking]) -> tuple[list[Pair], dict[str, int]]:
    """Every strictly ordered (chosen, rejected) pair of every ranking, and what was left out:
    `identical` pairs (the same answer above itself: no preference to learn) and `no_pair`
    rankings (full ties)."""
    pairs: list[Pair] = []
    identical = no_pair = 0
    for r in rankings:
        ordered = ranking_pairs(r.tiers, len(r.completions))
        if not ordered:
            no_pair += 1
        prompt = r.conversation("")[:-1]
        for w, l in ordered:
            if r.completions[w] == r.completions[l]:
                identical += 1
            else:
                pairs.append((prompt, r.completions[w], r.completions[l]))
    return pairs, {"identical": identical, "no_pair": no_pair}


def _examples(tokenizer: Any, pairs: Sequence[Pair], max_length: int) -> list[Any]:
    """(ids, labels) of each pair's chosen and rejected conversation, the answer's tokens
    labelled; a conversation longer than `max_length` keeps its end (the answer). A ranking's
    pairs repeat its answers: each conversation is tokenized once."""
    done: dict[tuple, tuple[list[int], list[int]]] = {}

    def encoded(prompt: list[Message], answer: str) -> tuple[list[int], list[int]]:
        key = (*((m["role"], m["content"]) for m in prompt), answer)
        if key not in done:
            conversation = [*prompt, {"role": "assistant", "content": answer}]
            ids, labels = sft_example(tokenizer, conversation, 10**9)
            done[key] = (ids[-max_length:], labels[-max_length:])
        return done[key]

    return [(encoded(p, chosen), encoded(p, rejected)) for p, chosen, rejected in pairs]


def sequence_logprobs(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Summed log-probabilities of the labelled tokens of right-padded rows (B values)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = token_logprobs(logits[:, :-1], labels.clamp_min(0))
    return (logp * mask).sum(1)


def pair_batch(examples: Sequence[Any], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Chosen rows then rejected rows of a batch of examples (one forward pass for both)."""
    rows = [e[0] for e in examples] + [e[1] for e in examples]
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


def _shared_length(
    chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]]
) -> int:
    """Tokens the two conversations share before either differs or carries a label (the
    prompt), keeping at least one token of each to follow them."""
    limit = min(len(chosen[0]), len(rejected[0])) - 1
    n = 0
    while n < limit and chosen[0][n] == rejected[0][n] and IGNORE == chosen[1][n] == rejected[1][n]:
        n += 1
    return n


def pair_logprobs(model: Any, examples: Sequence[Any], pad_id: int, device: Any) -> Tensor:
    """`sequence_logprobs` of the chosen rows then the rejected rows, with each pair's shared
    prompt run once (`rollout.continuation_outputs`): less work wherever prompts are long
    next to their answers (15% less time for the arithmetic task's pairs on a CPU)."""
    from selfsup.lm.alignment.rollout import continuation_outputs

    shared = [_shared_length(c, r) for c, r in examples]
    if min(shared) == 0:
        return sequence_logprobs(model, pair_batch(examples, pad_id, device))
    prefixes = torch.full((len(examples), max(shared)), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefixes)
    for row, ((ids, _), n) in enumerate(zip((e[0] for e in examples), shared, strict=True)):
        prefixes[row, -n:] = torch.tensor(ids[:n])  # left-padded
        prefix_mask[row, -n:] = 1
    rests = [  # what follows the prompt: the chosen rows, then the rejected rows
        (ids[n:], labels[n:])
        for side in (0, 1)
        for (ids, labels), n in zip((e[side] for e in examples), shared, strict=True)
    ]
    batch = {k: v.to(device) for k, v in collate(rests, pad_id).items()}
    rows = torch.arange(len(examples), device=device).repeat(2)
    logits, _ = continuation_outputs(model, prefixes.to(device), prefix_mask.to(device), rows,
                                     batch["input_ids"], batch["attention_mask"])  # fmt: skip
    mask = batch["labels"] != IGNORE
    return (token_logprobs(logits, batch["labels"].clamp_min(0)) * mask).sum(1)


@torch.no_grad()
def _with_reference(
    reference: Any, examples: list, pad_id: int, batch_size: int = 64
) -> list[tuple[Any, Any, float, float]]:
    """Each example with the reference's summed log-probabilities of its two answers (each
    distinct conversation scored once: a ranking of K answers has up to K(K-1)/2 pairs)."""
    reference.eval()
    device = next(reference.parameters()).device
    rows = list({tuple(e[0]): e for pair in examples for e in pair}.values())
    scores: dict[tuple, float] = {}
    for s in range(0, len(rows), batch_size):
        part = rows[s : s + batch_size]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        for (ids, _), logp in zip(part, sequence_logprobs(reference, batch).tolist(), strict=True):
            scores[tuple(ids)] = logp
    return [(c, r, scores[tuple(c[0])], scores[tuple(r[0])]) for c, r in examples]


def preference_data(config: Any) -> tuple[Any, Any, list, list]:
    """(tokenizer, policy, training examples, validation examples) of a preference stage's
    checked options: every (chosen, rejected) pair of --data with two different answers as
    `_examples`, the policy --init with its special ids (dpo, simpo)."""
    from selfsup.lm.alignment.rlhf import load_policy

    rankings = read_rankings(config.data)
    train_r, val_r = split_validation(rankings, config.val_fraction, "ranked prompts")
    train_pairs, left_train = preference_pairs(train_r)
    val_pairs, left_val = preference_pairs(val_r)
    identical = left_train["identical"] + left_val["identical"]
    no_pair = left_train["no_pair"] + left_val["no_pair"]
    if identical or no_pair:
        print(
            f"{config.data}: left out {identical} pairs whose chosen and rejected answers are "
            f"identical and {no_pair} rankings with no strictly ordered pair"
        )
    if not train_pairs:
        raise SelfsupError(
            f"{config.data}: no preference pair with two different answers to train on"
        )
    tokenizer, model = load_policy(config.init)
    set_special_ids(model, tokenizer)
    check_rankings_fit(tokenizer, rankings, config, model)
    examples = [
        _examples(tokenizer, pairs, config.max_length) for pairs in (train_pairs, val_pairs)
    ]
    return tokenizer, model, examples[0], examples[1]


def reward_accuracy(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """The logged metrics of implicit rewards: pairs ordered right (ties half), mean margin."""
    accuracy = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()
    return {"reward_acc": accuracy.item(), "margin": (chosen - rejected).mean().item()}


PairLoss = Callable[[Any, Tensor, Tensor, list], tuple[Tensor, Tensor, Tensor]]


def fit_pairs(
    stage: str, config: Any, command: str | None, pair_loss: PairLoss, reference: bool
) -> Path:
    """Train a preference stage (dpo, simpo): the checked options, the pairs and the policy
    (`preference_data`), each example with the frozen reference's log-probabilities when
    `reference` (with --lora-r the policy itself with its adapters off, else a copy), dropout
    off (the rewards are the policy's own log-probabilities); a batch's
    loss is `pair_loss(config, chosen logps, rejected logps, batch)` -> (loss, chosen rewards,
    rejected rewards), and `reward_accuracy` its logged metrics."""
    config = checked_config(config)  # the stage's own ranges too
    torch.manual_seed(config.seed)
    tokenizer, model, train, val = preference_data(config)
    pad = tokenizer.pad_token_id
    model = lora.adapt(model, config, config.init, tokenizer)
    if reference:
        frozen = lora.reference(model) or copy.deepcopy(model)
        train, val = _with_reference(frozen, train, pad), _with_reference(frozen, val, pad)
        del frozen
    disable_dropout(model)

    def loss_fn(m: Any, batch: list) -> tuple[Tensor, dict[str, float]]:
        device = next(m.parameters()).device
        logps = pair_logprobs(m, [(e[0], e[1]) for e in batch], pad, device)
        n = len(batch)
        loss, chosen, rejected = pair_loss(config, logps[:n], logps[n:], batch)
        return loss, reward_accuracy(chosen, rejected)

    return fit_stage(stage, config, command, model, tokenizer, train, val, loss_fn)


def dpo(config: Options, command: str | None = None) -> Path:
    """DPO from the SFT model on preference pairs; returns the run directory."""

    def pair_loss(c: Options, chosen: Tensor, rejected: Tensor, batch: list) -> Any:
        ref = torch.tensor([[rc, rr] for _, _, rc, rr in batch], device=chosen.device)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], c.beta)

    return fit_pairs("dpo", config, command, pair_loss, reference=True)


class DPO(EpochStage):
    Options = Options
    help = "direct preference optimisation of an SFT model on ranked or chosen/rejected pairs"
    description = (
        "DPO (Rafailov et al., 2023): the SFT model learns from preference pairs directly, no "
        "reward model and no sampling; the SFT model itself is the frozen reference. Writes a "
        "run directory (training counted in --epochs)."
    )
    entry = "dpo"
    written = "hf/ the policy, metrics.csv, checkpoint"
    shown = ("val_reward_acc", "val_loss")
