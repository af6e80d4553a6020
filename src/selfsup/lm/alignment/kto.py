"""KTO, Kahneman-Tversky optimisation (Ethayarajh et al., 2024): `selfsup lm kto`.

Learns from unpaired answers, each labelled desirable or undesirable. With r = log π(y|x) -
log π_ref(y|x) an answer's log-ratio to the frozen reference (the SFT model) and z0 the batch's
reference point, the mean over the batch's answers of λ_D·(1 - σ(β·(r - z0))) for a desirable
answer and λ_U·(1 - σ(β·(z0 - r))) for an undesirable one. z0 = max(0, mean(log π - log π_ref))
over mismatched pairs (every prompt of the batch with the answer of the example before it: an
estimate of KL(π || π_ref)), detached; with `--devices N` the whole batch's pairs and mean over
every process's share (an all-reduced sum and count), so N processes train as one. Data: TRL's
unpaired records, or the rankings `lm dpo` reads (each pair's chosen answer desirable, its
rejected one undesirable); the loop (Fabric, epochs, validation, checkpoints, RUN/hf) is
`posttrain`'s.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.engine.distributed import gather_objects, mean_over_rows, rank
from selfsup.lm.alignment.dpo import DPO, _with_reference, preference_data, sequence_logprobs
from selfsup.lm.alignment.dpo import Options as DPOOptions
from selfsup.lm.alignment.ppo import disable_dropout
from selfsup.lm.data.chat_data import IGNORE, collate, sft_example
from selfsup.lm.data.conversations import Ranking, jsonl_records, parse_conversation
from selfsup.lm.models import lora
from selfsup.lm.training import posttrain


@dataclass
class Options(DPOOptions):
    """Options of `selfsup lm kto`: DPO's (β too), with KTO's data, batch and the two weights."""

    data: str = option(
        "",
        "JSONL of unpaired answers {prompt, completion, label: true|false} (TRL's KTO format, "
        "text or conversational), or the rankings / chosen-rejected records lm dpo reads (each "
        "pair's chosen answer desirable, its rejected one undesirable) (required unless --resume "
        "RUN)",
    )
    epochs: int = option(1, "passes over the answers", check=">=1")
    batch_size: int = option(
        32,
        "answers per step (at least 2: the KL estimate pairs each prompt with another answer)",
        check=">=2",
    )
    desirable_weight: float = option(1.0, "λ_D, a desirable answer's loss weight", check=">0")
    undesirable_weight: float = option(1.0, "λ_U, an undesirable answer's loss weight", check=">0")


def kto_loss(policy: Tensor, reference: Tensor, desirable: Tensor, kl_ratio: Tensor, beta: float,
             weights: tuple[float, float] = (1, 1)) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss, rewards, z0) of a batch of answers: `policy` and `reference` their summed
    log-probabilities, `desirable` their labels, `kl_ratio` the policy's minus the reference's
    log-probabilities of the batch's mismatched pairs. z0 = max(0, mean(kl_ratio)), detached,
    the mean over every process's pairs when several train (`mean_over_rows`);
    with r = policy - reference, the loss is the mean over the answers of λ_D·(1 - σ(β·(r - z0)))
    for a desirable one and λ_U·(1 - σ(β·(z0 - r))) for an undesirable one, (λ_D, λ_U) =
    `weights`: TRL's KTOTrainer with loss_type="kto". The rewards β·r are returned detached."""
    if policy.numel() == 0:
        raise SelfsupError("KTO loss of an empty batch: no answer")
    z0 = mean_over_rows(kl_ratio).clamp(min=0).detach()
    r = policy - reference
    losses = torch.where(
        desirable,
        weights[0] * (1 - torch.sigmoid(beta * (r - z0))),
        weights[1] * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return losses.mean(), beta * r.detach(), z0


def read_unpaired(path: str | Path) -> list[tuple[Ranking, bool]] | None:
    """TRL's unpaired records ({prompt, completion, label}; prompt a string or messages ending
    with the user's, completion a string or one assistant message), each as a one-answer
    Ranking with its label; None when the first record has no 'label' (a rankings file)."""
    out: list[tuple[Ranking, bool]] = []
    for where, record in jsonl_records(path):
        if "label" not in record:
            if not out:
                return None
            raise SelfsupError(
                f"{where}: no 'label': every record of an unpaired file needs 'prompt', "
                "'completion' and 'label' (true or false), as its first one"
            )
        label, prompt, completion = (record.get(k) for k in ("label", "prompt", "completion"))
        if not isinstance(label, bool):
            raise SelfsupError(f"{where}: 'label' must be true or false, got {json.dumps(label)}")
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = parse_conversation({"messages": [*prompt, *completion]}, where)
            if len(completion) != 1 or messages[-1]["role"] != "assistant":
                raise SelfsupError(f"{where}: 'completion' must be one assistant message")
        elif isinstance(prompt, list) or isinstance(completion, list):
            raise SelfsupError(
                f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages"
            )
        else:
            messages = parse_conversation({"prompt": prompt, "completion": completion}, where)
        if messages[-2]["role"] != "user":
            raise SelfsupError(f"{where}: the prompt must end with the user's turn")
        history = tuple(messages[:-2])
        answer = (messages[-1]["content"],)
        out.append((Ranking(messages[-2]["content"], answer, ((0,),), None, history, where), label))
    return out


Row = tuple[list[int], list[int]]  # (ids, labels): the answer's tokens labelled


def _split(row: Row) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a conversation's row: the answer is its last labelled run."""
    ids, labels = row
    n = len(labels)
    while n > 0 and labels[n - 1] != IGNORE:
        n -= 1
    return ids[:n], ids[n:]


def _row(prompt: list[int], answer: list[int], max_length: int) -> Row:
    """The row of a prompt answered by `answer` (only the answer labelled), cut to its end."""
    return (prompt + answer)[-max_length:], ([IGNORE] * len(prompt) + answer)[-max_length:]


def kto_data(config: Any) -> tuple[Any, Any, list, list]:
    """(tokenizer, policy, training examples, validation examples): each example (prompt ids,
    answer ids, desirable), from TRL's unpaired records or from DPO's pairs, unpaired as TRL's
    `unpair_preference_dataset` does."""
    from selfsup.lm.alignment.rlhf import load_policy

    records = read_unpaired(config.data)
    if records is None:  # rankings or chosen/rejected records: every pair gives two answers
        tokenizer, model, *parts = preference_data(config)
        rows = [
            [(row, label) for c, r in p for row, label in ((c, True), (r, False))] for p in parts
        ]
    else:
        train, val = posttrain.split_validation(records, config.val_fraction, "answers")
        tokenizer, model = load_policy(config.init)
        posttrain.set_special_ids(model, tokenizer)
        posttrain.check_rankings_fit(tokenizer, [r for r, _ in records], config, model)
        rows = [
            [
                (sft_example(tokenizer, r.conversation(r.completions[0]), 10**9), label)
                for r, label in part
            ]
            for part in (train, val)
        ]
    desirable = sum(label for part in rows for _, label in part)
    total = sum(len(part) for part in rows)
    print(f"{config.data}: {desirable} desirable and {total - desirable} undesirable answers")
    train, val = ([(*_split(row), label) for row, label in part] for part in rows)
    return tokenizer, model, train, val


def kto_metrics(rewards: Tensor, desirable: Tensor, z0: Tensor, beta: float) -> dict[str, float]:
    """The logged metrics: answers on their label's side of the reference point β·z0 (a tie
    half), and the KL estimate z0."""
    right = torch.where(desirable, rewards - beta * z0, beta * z0 - rewards)
    accuracy = ((right > 0).float() + 0.5 * (right == 0).float()).mean()
    return {"reward_acc": accuracy.item(), "kl": z0.item()}


def kto(config: Options, command: str | None = None) -> Path:
    """KTO from the SFT model on desirable and undesirable answers; returns the run directory."""
    config = posttrain.checked_config(config)  # β's and the weights' ranges too
    torch.manual_seed(config.seed)
    tokenizer, model, train, val = kto_data(config)
    pad = tokenizer.pad_token_id
    length = config.max_length
    model = lora.adapt(model, config, config.init, tokenizer)  # --lora-r: the base is the reference
    reference = lora.reference(model) or copy.deepcopy(model).eval().requires_grad_(False)
    disable_dropout(model)  # the policy's log-probabilities are compared with the reference's

    def scored(examples: Sequence[tuple]) -> list[tuple]:  # the reference's log-probability
        rows = [_row(p, a, length) for p, a, _ in examples]
        pairs = _with_reference(reference, [(row, row) for row in rows], pad)
        return [(row, p, a, label, ref) for row, (p, a, label), (_, _, ref, _) in
                zip(rows, examples, pairs, strict=True)]  # fmt: skip

    train, val = scored(train), scored(val)

    def loss_fn(m: Any, batch: list) -> tuple[Tensor, dict[str, float]]:
        device = next(m.parameters()).device
        answers = [e[2] for e in batch]
        mismatched = [
            _row(e[1], a, length) for e, a in zip(batch, previous_answers(answers), strict=True)
        ]
        if not batch:  # a process's empty share: its part in the KL estimate's all-reduce only
            mean_over_rows(torch.zeros(0, device=device))
            return torch.zeros((), device=device), {}
        with torch.no_grad():  # z0 is detached: no gradient through the KL estimate
            kl_batch = _batch(mismatched, pad, device)
            policy_kl = sequence_logprobs(m, kl_batch)
            ref_kl = sequence_logprobs(reference.to(device), kl_batch)
        logps = sequence_logprobs(m, _batch([e[0] for e in batch], pad, device))
        ref = torch.tensor([e[4] for e in batch], device=device, dtype=logps.dtype)
        good = torch.tensor([e[3] for e in batch], device=device)
        weights = (config.desirable_weight, config.undesirable_weight)
        loss, rewards, z0 = kto_loss(logps, ref, good, policy_kl - ref_kl, config.beta, weights)
        return loss, kto_metrics(rewards, good, z0, config.beta)

    loss_fn.collective = True  # type: ignore[attr-defined]  # an empty share takes part too
    return posttrain.fit_stage("kto", config, command, model, tokenizer, train, val, loss_fn)


def previous_answers(answers: list[list[int]]) -> list[list[int]]:
    """Each example's predecessor's answer in the whole batch, cyclically (the first's is the
    last's): of several processes, each holding a contiguous share in rank order, the first
    one's comes from the nearest earlier process with a share (a collective: every process
    calls it, with or without examples)."""
    lasts = gather_objects(answers[-1:])
    r = rank()
    before = [a for part in lasts[r + 1 :] + lasts[:r] for a in part]  # cyclic, ending before r
    return ((before[-1:] or answers[-1:]) + answers[:-1]) if answers else []


def _batch(rows: Sequence[Row], pad_id: int, device: Any) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


class KTO(DPO):
    Options = Options
    help = "KTO: unpaired desirable and undesirable answers against the frozen SFT model"
    description = (
        "KTO (Ethayarajh et al., 2024): the SFT model learns from answers labelled desirable or "
        "undesirable, no pairs needed; the SFT model itself is the frozen reference, and the "
        "batch's KL estimate the reference point. Writes a run directory (training counted in "
        "--epochs)."
    )
    entry = "kto"
    # summary: DPO's closing lines (val_reward_acc: answers on their label's side of z0)
