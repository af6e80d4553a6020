"""Sampling answers from a chat model and scoring them token by token (for PPO and best-of-n).

Works with any Hugging Face causal LM. Prompts are left-padded so that every answer starts at
the same column; the answer ends at the first end-of-turn token (the tokenizer's eos: ``<END>``,
or the end of a turn in the model's own chat template, e.g. ``<|im_end|>``, ``<|eot_id|>``) and
everything after it is padding. Positions are counted from each row's first real token,
the same way `generate` counts them, so the scores here match the sampling distribution.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.decoding import (
    continuation_logits,
    continuation_positions,
    position_ids,
    sample_tokens,
    sequence_scores,
    unwrap,
)
from selfsup.lm.data.conversations import (
    ROLE_MARKERS,
    Message,
    end_of_turn,
    own_template,
    render_prompt,
)
from selfsup.lm.losses.ppo import token_logprobs


@dataclass
class Rollout:
    """B sampled answers: `sequences` = left-padded prompt (P columns) + answer (T columns)."""

    sequences: Tensor  # B×(P+T) token ids
    attention_mask: Tensor  # B×(P+T), 0 on padding (left of the prompt, right of the answer)
    prompt_length: int  # P
    response_mask: Tensor  # B×T, 1 on answer tokens up to and including the end token
    ended: Tensor  # B bool: the answer has its end token
    suppressed: tuple[int, ...] = ()  # token ids the policy may not emit (padding, role markers)
    temperature: float = 1.0  # the answers were sampled from softmax(logits / temperature)

    @property
    def responses(self) -> Tensor:
        return self.sequences[:, self.prompt_length :]


def suppressed_tokens(tokenizer: Any) -> tuple[int, ...]:
    """Every special token but the end of turn (padding, role markers, a pretraining corpus's
    end-of-text, ...): an answer may end its turn, never start another one."""
    ids = {
        *tokenizer.all_special_ids,
        *tokenizer.convert_tokens_to_ids(list(ROLE_MARKERS.values())),
    }
    ids -= {tokenizer.eos_token_id, tokenizer.unk_token_id, None}
    if own_template(tokenizer):  # its end of turn, even where eos was not made that token
        ids.discard(tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)))
    return tuple(sorted(ids))


def encode_prompts(tokenizer: Any, conversations: Sequence[Sequence[Message]]) -> dict[str, Tensor]:
    """Left-padded ids of the conversations rendered up to the assistant's turn (in the
    tokenizer's own chat template when it has one, ending with its generation prompt)."""
    texts = [render_prompt(c, tokenizer) for c in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator_seed: int | None = None,
) -> Rollout:
    """Sample one answer per conversation (pure sampling at temperature 1 by default, so the
    answers come from the policy PPO optimises)."""
    device = next(model.parameters()).device
    prompts = {k: v.to(device) for k, v in encode_prompts(tokenizer, conversations).items()}
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    suppressed = suppressed_tokens(tokenizer)
    options = dict(
        temperature=temperature, top_k=top_k, suppressed=suppressed,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    answers = sample_tokens(model, **prompts, max_new_tokens=max_new_tokens, **options)
    if answers is not None:  # GPT-2: the lean loop, the same tokens as generate's
        sequences = torch.cat([prompts["input_ids"], answers], 1)
    else:
        sequences = model.generate(
            **prompts,
            do_sample=True,
            temperature=temperature,
            top_k=top_k or None,
            top_p=None,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=list(suppressed),
        )
    p = prompts["input_ids"].shape[1]
    responses = sequences[:, p:]
    is_end = responses == tokenizer.eos_token_id
    ended = is_end.any(1)
    # real answer tokens: everything up to and including the first end token
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0
    response_mask = (~after_end).long()
    attention_mask = torch.cat([prompts["attention_mask"], response_mask], 1)
    return Rollout(sequences, attention_mask, p, response_mask, ended, suppressed, temperature)


def forward_response(
    model: nn.Module, rollout: Rollout, value_head: nn.Module | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logits B×T×V, log-probabilities B×T of the answer tokens, values B×T or None).

    Position P-1+t predicts answer token t; the value of that state is read there too. The
    logits are those of the distribution the answers were sampled from: suppressed tokens
    masked out and divided by the rollout's temperature (as TRL does), so that PPO's ratios,
    KL and advantages are computed on-policy at any `--temperature`.
    """
    p, t = rollout.prompt_length, rollout.responses.shape[1]
    prompts = rollout.sequences[:, :p]
    unique, rows = torch.unique(prompts, dim=0, return_inverse=True)
    lean = not torch.is_grad_enabled() and value_head is None  # a reference's: decoding.py
    if len(unique) < len(prompts) or lean:  # each prompt once
        first = torch.full((len(unique),), len(rows), device=rows.device)
        first = first.scatter_reduce(0, rows, torch.arange(len(rows), device=rows.device), "amin")
        logits, hidden = continuation_outputs(
            model, prompts[first], rollout.attention_mask[first, :p], rows,
            rollout.responses, rollout.response_mask, hidden=value_head is not None,
        )  # fmt: skip
    else:
        out = model(
            input_ids=rollout.sequences,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids(rollout.attention_mask),
            output_hidden_states=value_head is not None,
        )
        logits = out.logits[:, p - 1 : p - 1 + t]
        hidden = out.hidden_states[-1][:, p - 1 : p - 1 + t] if value_head is not None else None
    if rollout.suppressed:  # the distribution the answers were sampled from
        logits = logits.index_fill(-1, torch.tensor(rollout.suppressed, device=logits.device), -1e4)
    if rollout.temperature != 1.0:
        logits = logits / rollout.temperature
    values = None if hidden is None else value_head(hidden).squeeze(-1).float()  # type: ignore[misc]
    return logits, token_logprobs(logits, rollout.responses), values


def continuation_outputs(
    model: nn.Module,
    prefix_ids: Tensor,
    prefix_mask: Tensor,
    rows: Tensor,
    continuation: Tensor,
    continuation_mask: Tensor,
    hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits R×C×V (and last hidden states R×C×E) where [r, j] predicts token j of
    `continuation` row r, which follows prefix `rows[r]` (U left-padded prefixes, R
    right-padded continuations). Each prefix is run once and its keys and values go to every
    row that follows it (`index_select`: gradients reach the prefix from every row), the
    same maths as running each whole row, with less of it when prefixes repeat."""
    from transformers import DynamicCache

    prefix = (prefix_ids, position_ids(prefix_mask), prefix_mask)
    inputs = continuation[:, :-1]  # the last token predicts nothing
    rest = (
        inputs,
        continuation_positions(prefix_mask, rows, inputs.shape[1]),
        torch.cat([prefix_mask[rows], continuation_mask[:, :-1]], 1),
    )
    if not hidden and not torch.is_grad_enabled():  # a reference model's: the lean GPT-2 forward
        lean = continuation_logits(model, prefix, rows, rest)
        if lean is not None:
            return lean, None
    cache = DynamicCache()
    with warnings.catch_warnings():  # transformers 5 renames past_key_values, 4.x knows only it
        warnings.simplefilter("ignore", FutureWarning)
        first = model(
            input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=prefix[1],
            past_key_values=cache, use_cache=True, output_hidden_states=hidden,
        )  # fmt: skip
        logits = first.logits[rows, -1:]
        states = first.hidden_states[-1][rows, -1:] if hidden else None
        if inputs.shape[1]:
            cache.reorder_cache(rows)
            second = model(
                input_ids=inputs, attention_mask=rest[2], position_ids=rest[1],
                past_key_values=cache, use_cache=True, output_hidden_states=hidden,
            )  # fmt: skip
            logits = torch.cat([logits, second.logits], 1)
            if hidden:
                states = torch.cat([states, second.hidden_states[-1]], 1)  # type: ignore[list-item]
    return logits, states


@torch.no_grad()
def reward_scores(reward_model: nn.Module, rollout: Rollout) -> Tensor:
    """The reward model's scalar for each whole conversation (prompt + answer), read at each
    row's last attended token (its sequence length from the attention mask, as TRL's
    `get_reward`), not at the last token that differs from the padding id as transformers'
    pooling does: an answer that ends with eos == pad, or holds the pad id inside, is scored
    where it ends: by the lean forward where one applies, else the backbone and its score head
    (a module that is no transformers model pools itself)."""
    ids, mask = rollout.sequences, rollout.attention_mask
    last = ids.shape[1] - 1 - mask.flip(1).argmax(1)  # the last attended column of each row
    lean = sequence_scores(reward_model, ids, mask, last)
    if lean is not None:  # GPT-2, Llama: decoding.py's lean forward
        return lean[:, 0].float()
    if getattr(reward_model, "config", None) is not None:  # a transformers model
        return scores_at(reward_model, ids, mask, last)[:, 0].float()
    out = reward_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[:, 0].float()


def scores_at(model: nn.Module, ids: Tensor, mask: Tensor, last: Tensor) -> Tensor:
    """A sequence-classification model's scores (B×labels) read at column `last[b]` of each
    row: its backbone's hidden states through its `score` head, as TRL's `get_reward`."""
    base = unwrap(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if backbone is None or not hasattr(base, "score"):
        raise SelfsupError(
            f"the reward model ({type(model).__name__}) has no backbone and `score` head to read "
            "its score at each answer's end: use a *ForSequenceClassification model"
        )
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    rows = torch.arange(len(ids), device=ids.device)
    return base.score(hidden.last_hidden_state[rows, last])  # type: ignore[operator]


def decode_responses(tokenizer: Any, rollout: Rollout) -> list[str]:
    """The answers as text, without the end token and padding."""
    texts = []
    for ids, mask, ended in zip(
        rollout.responses, rollout.response_mask, rollout.ended, strict=True
    ):
        real = ids[mask.bool()]
        if ended:
            real = real[:-1]
        texts.append(tokenizer.decode(real, skip_special_tokens=False))
    return texts
