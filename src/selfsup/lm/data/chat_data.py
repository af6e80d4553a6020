"""Token batches for the stages after pretraining: conversations (SFT) and ranked answers (reward).

Both render text with the chat template of `selfsup.lm.data.conversations`: the tokenizer's own
(a Hugging Face model's), or selfsup's, whose markers a tokenizer first gets as special tokens
(`add_chat_tokens`; the model's embedding table grows to match).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.core.errors import SelfsupError
from selfsup.lm.data.conversations import (
    CHAT_TEMPLATE,
    CHAT_TOKENS,
    END,
    Message,
    Ranking,
    end_of_turn,
    own_template,
    tokenize_chat,
)
from selfsup.lm.losses.preference import ranking_pairs

IGNORE = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)


def add_chat_tokens(tokenizer: Any) -> int:
    """Make the tokenizer chat: one with a chat template of its own keeps it, its eos becomes the
    template's end-of-turn token and a missing pad token its former eos (TRL's choice), nothing
    added; any other gets selfsup's markers (and a padding token) as special tokens and
    selfsup's template. Returns how many tokens were added (resize the model's embeddings when
    > 0)."""
    if own_template(tokenizer):
        end = end_of_turn(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or end
        tokenizer.eos_token = end  # generation stops at the end of the assistant's turn
        return 0
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    tokenizer.eos_token = END  # generation stops at the end of the assistant's turn
    tokenizer.chat_template = CHAT_TEMPLATE  # apply_chat_template renders as selfsup does
    return added


def sft_example(
    tokenizer: Any, messages: Sequence[Message], max_length: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels copy the ids on assistant tokens and are IGNORE elsewhere;
    conversations longer than `max_length` tokens are cut at the end."""
    ids, trained = tokenize_chat(tokenizer, messages)
    labels = [i if t else IGNORE for i, t in zip(ids, trained, strict=True)]
    return ids[:max_length], labels[:max_length]


def pack(examples: Sequence[tuple[list[int], list[int]]], block: int) -> list[tuple[list, list]]:
    """Concatenate examples and cut the stream into blocks of `block` tokens (no padding wasted;
    an example may attend to the one before it in its block, as in TRL's packing)."""
    ids = [i for e in examples for i in e[0]]
    labels = [label for e in examples for label in e[1]]
    return [
        (ids[s : s + block], labels[s : s + block])
        for s in range(0, len(ids) - 1, block)
        if any(label != IGNORE for label in labels[s + 1 : s + block])
    ]


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    mask = torch.zeros_like(input_ids)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of predicting token t+1 at position t, over tokens whose label is not
    IGNORE: the prompt's tokens (and padding) contribute nothing."""
    targets = labels[:, 1:]
    if not (targets != IGNORE).any():
        raise SelfsupError("no assistant token in the batch to learn from")
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
    )


def ranking_batch(
    tokenizer: Any, rankings: Sequence[Ranking], max_length: int
) -> dict[str, Tensor]:
    """Every completion of every prompt as one row (prompt turn + answer turn), with the strictly
    ordered (winner, loser) row pairs and the prompt each pair belongs to."""
    rows, pairs, prompt_of_pair = [], [], []
    for p, r in enumerate(rankings):
        first = len(rows)
        for completion in r.completions:
            ids, _ = tokenize_chat(tokenizer, r.conversation(completion))
            rows.append((ids[-max_length:], ids[-max_length:]))  # keep the answer's end
        for w, l in ranking_pairs(r.tiers, len(r.completions)):
            pairs.append((first + w, first + l))
            prompt_of_pair.append(p)
    batch = collate(rows, tokenizer.pad_token_id)
    del batch["labels"]
    batch["pairs"] = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    batch["prompt_of_pair"] = torch.tensor(prompt_of_pair, dtype=torch.long)
    return batch
