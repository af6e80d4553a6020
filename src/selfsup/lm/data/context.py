"""What fits a model's context: the one place every `selfsup lm` stage asks.

`context_length` reads it (our GPT's block size, a Hugging Face config's n_positions or
max_position_embeddings); `check_fits` is the one check of a token count against it, naming the
line of the data file; `fit_prompt` makes a prompt leave room for the answer, by refusing or,
with `--truncate`, by cutting it from the left (TRL's `max_prompt_length`, keep the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from selfsup.core.errors import SelfsupError
from selfsup.lm.data.conversations import Message, render_prompt

POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length")


def context_length(model: Any) -> int | None:
    """The most tokens `model` reads at once: selfsup's GPT's block size, or the positions of a
    Hugging Face model (or config); None when it declares no bound."""
    block = getattr(model, "block_size", None)
    if isinstance(block, int) and block > 0:
        return block
    config = getattr(model, "config", model)
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def shortest_context(*models: Any) -> int | None:
    """The smallest context among models (a policy and its reward model read the same rows)."""
    known = [c for c in map(context_length, models) if c is not None]
    return min(known) if known else None


def check_fits(length: int, context: int | None, where: str, what: str, hint: str) -> None:
    """One line unless `length` tokens fit the context: WHERE: WHAT is N tokens long, beyond the
    model's context of C tokens; HINT."""
    if context is not None and length > context:
        raise SelfsupError(
            f"{where}: {what} is {length} tokens long, beyond the model's context of "
            f"{context} tokens; {hint}"
        )


def check_new_tokens(max_new_tokens: int, context: int | None) -> None:
    """--max-new-tokens must leave room for a prompt; the line names a value that does."""
    if context is not None and max_new_tokens >= context:
        raise SelfsupError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's "
            f"context of {context} tokens; pass --max-new-tokens {max(1, context // 2)} or less"
        )


def default_new_tokens(context: int | None, wanted: int = 64) -> int:
    """`wanted` answer tokens, or half the context when that is shorter."""
    return wanted if context is None else max(1, min(wanted, context // 2))


def prompt_length(tokenizer: Any, messages: Sequence[Message]) -> int:
    """Tokens of the conversation rendered up to the assistant's turn (what a model continues),
    in the tokenizer's own chat template when it has one."""
    return len(tokenizer(render_prompt(messages, tokenizer), add_special_tokens=False)["input_ids"])


def fit_prompt(
    tokenizer: Any,
    messages: Sequence[Message],
    context: int | None,
    max_new_tokens: int,
    where: str,
    truncate: bool,
) -> list[Message]:
    """The prompt, checked to leave `max_new_tokens` of the model's context: refused in one line
    naming `where`, or (`truncate`) cut from the left (`shorten`)."""
    messages = list(messages)
    if context is None:
        return messages
    check_new_tokens(max_new_tokens, context)
    length = prompt_length(tokenizer, messages)
    if length + max_new_tokens <= context:
        return messages
    if not truncate:
        raise SelfsupError(
            f"{where}: the prompt is {length} tokens long: with --max-new-tokens "
            f"{max_new_tokens} it does not fit the model's context of {context} tokens; "
            "shorten it, or pass --truncate to cut long prompts from the left"
        )
    return shorten(tokenizer, messages, context - max_new_tokens, cut_text=True)


def shorten(
    tokenizer: Any, messages: Sequence[Message], room: int, cut_text: bool
) -> list[Message]:
    """The latest turns of the conversation whose prompt takes at most `room` tokens: the oldest
    turns go first (a system message last) and the conversation then starts at a user turn;
    `cut_text` then cuts the start of the one message left. One line when nothing fits."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    while True:
        length = prompt_length(tokenizer, system + rest)
        if length <= room:
            return system + rest
        if len(rest) > 1:
            rest = rest[1:]
            while len(rest) > 1 and rest[0]["role"] != "user":
                rest = rest[1:]
        elif system:
            system = []
        elif cut_text:
            return [_cut_start(tokenizer, rest[0], room)]
        else:
            raise SelfsupError(
                f"the message is {length} tokens long with its markers: the model's context "
                f"leaves {room} tokens for the prompt and has no room for it"
            )


def _cut_start(tokenizer: Any, message: Message, room: int) -> Message:
    """`message` less the fewest leading characters that make its prompt fit `room` tokens."""
    text = message["content"]

    def fits(start: int) -> bool:
        return prompt_length(tokenizer, [{**message, "content": text[start:]}]) <= room

    if not fits(len(text) - 1):
        raise SelfsupError(
            f"the chat markers alone leave no room in {room} tokens of prompt: lower "
            "--max-new-tokens"
        )
    low, high = 0, len(text) - 1  # fits(high); find the smallest start that fits
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    return {**message, "content": text[low:]}
