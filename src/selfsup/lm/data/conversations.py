"""Conversations and rankings in the JSONL formats people already have, and the chat template.

Conversations (supervised fine-tuning), one JSON object per line:
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``
  (roles: system, user, assistant), or
- ``{"prompt": "...", "completion": "..."}`` (one user turn, one assistant turn).

Rankings (reward model):
- ``{"prompt": "...", "completions": ["...", "...", ...], "ranking": "D > C > A = B"}``
  (letters name the completions in order; ``=`` ties), or
- ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (one pair), also in TRL's
  conversational forms: ``prompt`` a list of messages ending with the user's and ``chosen`` /
  ``rejected`` one assistant message each, or no ``prompt`` and ``chosen`` / ``rejected`` whole
  conversations that share everything but their last (assistant) message (implicit prompt).
An optional ``"gold"`` list (one number per completion, written by `selfsup lm label`) is the
simulated labelers' true score; the reward model never trains on it, it only measures a ceiling.

selfsup's chat template writes every turn as its role marker, the text and the end-of-turn marker:
``<USER>How are you?<END><ASSISTANT>Fine.<END>``. Only assistant text and its ``<END>`` are
trained on; the model then answers a prompt rendered up to ``<ASSISTANT>`` and stops at ``<END>``.
A tokenizer with a chat template of its own (a Hugging Face model's: ChatML, Llama 3, ...) renders
with it (`apply_chat_template`): the trained-on text is each assistant turn's content and the
template's end-of-turn token, found by rendering the conversation prefix by prefix (as TRL does).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfsup.core.errors import SelfsupError
from selfsup.core.jsonl import json_objects
from selfsup.lm.losses.preference import parse_ranking

ROLE_MARKERS = {"system": "<SYSTEM>", "user": "<USER>", "assistant": "<ASSISTANT>"}
END = "<END>"
CHAT_TOKENS = (*ROLE_MARKERS.values(), END)

Message = dict[str, str]


@dataclass(frozen=True)
class Ranking:
    """One prompt, its K completions and the labeler's tiers of completion indices, best first."""

    prompt: str
    completions: tuple[str, ...]
    tiers: tuple[tuple[int, ...], ...]
    gold: tuple[float, ...] | None = None  # simulated labelers' true scores, when known
    history: tuple[Message, ...] = ()  # the turns before the user's `prompt` (TRL's formats)
    where: str = field(default="", compare=False)  # "FILE:LINE" it was read from

    def conversation(self, completion: str) -> list[Message]:
        """The prompt's conversation answered by `completion`."""
        return [
            *self.history,
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": completion},
        ]


def jsonl_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every non-blank line; `where` is "FILE:LINE" for error messages."""
    path = Path(path)
    if not path.is_file():
        raise SelfsupError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SelfsupError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); expected a JSONL file"
        ) from None
    for number, record in json_objects(text, path):
        yield f"{path}:{number}", record


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SelfsupError(f"{where}: field {key!r} must be a non-empty string")
    return value


def parse_conversation(record: dict[str, Any], where: str = "conversation") -> list[Message]:
    """A record in either conversation format as a list of {role, content} messages."""
    if "messages" in record:
        out = _messages(record["messages"], where)
    elif "prompt" in record and "completion" in record:
        out = [
            {"role": "user", "content": _text(record, "prompt", where)},
            {"role": "assistant", "content": _text(record, "completion", where)},
        ]
    else:
        raise SelfsupError(f"{where}: expected a 'messages' list or 'prompt' and 'completion'")
    if not any(m["role"] == "assistant" for m in out):
        raise SelfsupError(f"{where}: no assistant turn to learn from")
    return out


def read_conversations(path: str | Path) -> list[list[Message]]:
    """Every conversation of a JSONL file; an empty file is an error."""
    return [messages for _, messages in conversation_lines(path)]


def conversation_lines(path: str | Path) -> list[tuple[str, list[Message]]]:
    """("FILE:LINE", conversation) for every conversation of a JSONL file (none: an error)."""
    conversations = [
        (where, parse_conversation(record, where)) for where, record in jsonl_records(path)
    ]
    if not conversations:
        raise SelfsupError(f"{path}: no conversations in the file")
    return conversations


def read_prompts(path: str | Path) -> list[tuple[list[Message], dict[str, Any]]]:
    """(conversation so far, whole record) per line: a ``prompt`` string or a ``messages`` list
    whose last turn is the user's; other fields (e.g. what a gold score needs) ride along."""
    return [(messages, record) for _, messages, record in prompt_lines(path)]


def prompt_lines(path: str | Path) -> list[tuple[str, list[Message], dict[str, Any]]]:
    """`read_prompts` with the "FILE:LINE" each prompt was read from."""
    out = []
    for where, record in jsonl_records(path):
        if "messages" in record:
            messages = _messages(record["messages"], where)
            if messages[-1]["role"] != "user":
                raise SelfsupError(f"{where}: the last message must be the user's")
        else:
            messages = [{"role": "user", "content": _text(record, "prompt", where)}]
        out.append((where, messages, record))
    if not out:
        raise SelfsupError(f"{path}: no prompts in the file")
    return out


def _messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise SelfsupError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_MARKERS:
            raise SelfsupError(
                f"{where}: messages[{i}] needs a role among {', '.join(ROLE_MARKERS)}"
            )
        out.append({"role": m["role"], "content": _text(m, "content", f"{where} messages[{i}]")})
    return out


def read_rankings(path: str | Path) -> list[Ranking]:
    """Every ranked prompt of a JSONL file (K completions + ranking, or chosen/rejected)."""
    out = []
    for where, record in jsonl_records(path):
        history: tuple[Message, ...] = ()
        if "chosen" in record or "rejected" in record:
            prompt, history, completions = _preference_pair(record, where)
            tiers: list[list[int]] = [[0], [1]]
        else:
            prompt = _text(record, "prompt", where)
            raw = record.get("completions")
            if not isinstance(raw, list) or len(raw) < 2:
                raise SelfsupError(f"{where}: 'completions' must list at least two completions")
            if not all(isinstance(c, str) for c in raw):
                raise SelfsupError(f"{where}: every completion must be a string (may be empty)")
            completions = tuple(raw)
            ranking = record.get("ranking")
            if not isinstance(ranking, str):
                raise SelfsupError(f"{where}: field 'ranking' must be a string like 'B > A = C'")
            try:
                tiers = parse_ranking(ranking, len(completions))
            except SelfsupError as e:
                raise SelfsupError(f"{where}: {e}") from None
        gold = record.get("gold")
        if gold is not None and (
            not isinstance(gold, list)
            or len(gold) != len(completions)
            or not all(isinstance(g, int | float) and not isinstance(g, bool) for g in gold)
        ):
            raise SelfsupError(f"{where}: 'gold' must list one number per completion")
        if gold is not None and not all(math.isfinite(g) for g in gold):
            raise SelfsupError(f"{where}: 'gold' holds {gold}: every score must be a finite number")
        out.append(
            Ranking(
                prompt,
                completions,
                tuple(tuple(t) for t in tiers),
                None if gold is None else tuple(float(g) for g in gold),
                history,
                where,
            )
        )
    if not out:
        raise SelfsupError(f"{path}: no rankings in the file")
    return out


def _preference_pair(
    record: dict[str, Any], where: str
) -> tuple[str, tuple[Message, ...], tuple[str, str]]:
    """(user prompt, earlier turns, (chosen, rejected)) of a chosen/rejected record in TRL's
    standard or conversational form, explicit or implicit prompt."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, str) or isinstance(rejected, str):
        if "prompt" not in record:
            raise SelfsupError(
                f"{where}: text 'chosen'/'rejected' need a 'prompt' (an implicit prompt is read "
                "only from conversations: lists of messages)"
            )
        return (
            _text(record, "prompt", where),
            (),
            (_text(record, "chosen", where), _text(record, "rejected", where)),
        )
    answers = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        answers.append(_messages(value, f"{where} {key}"))
    if "prompt" in record:
        context = _messages(record["prompt"], f"{where} prompt")
        if any(len(a) != 1 for a in answers):
            raise SelfsupError(
                f"{where}: with a 'prompt', 'chosen' and 'rejected' hold one assistant message each"
            )
    else:  # implicit prompt: the turns both conversations share
        context = answers[0][:-1]
        if answers[1][:-1] != context:
            raise SelfsupError(
                f"{where}: 'chosen' and 'rejected' must share every turn but their last"
            )
        answers = [a[-1:] for a in answers]
    if any(a[0]["role"] != "assistant" for a in answers):
        raise SelfsupError(f"{where}: 'chosen' and 'rejected' must end with the assistant's turn")
    if not context or context[-1]["role"] != "user":
        raise SelfsupError(f"{where}: the prompt must end with the user's turn")
    return (
        context[-1]["content"],
        tuple(context[:-1]),
        (answers[0][0]["content"], answers[1][0]["content"]),
    )


def _jinja_template() -> str:
    """The template above in Jinja, for `tokenizer.chat_template`: Hugging Face's
    `apply_chat_template` (and TRL's trainers through it) renders exactly what `chat_segments` /
    `render_prompt` do; an unknown role is an error there too."""
    branches = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == '{role}' -%}}{marker}"
        for i, (role, marker) in enumerate(ROLE_MARKERS.items())
    )
    return (
        "{%- for message in messages -%}"
        + branches
        + "{%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}{%- endif -%}"
        + "{{- message['content'] -}}"
        + END
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + ROLE_MARKERS["assistant"]
        + "{%- endif -%}"
    )


CHAT_TEMPLATE = _jinja_template()


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template when it is not selfsup's (None: selfsup's markers render)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    return (
        template if isinstance(template, str) and template and template != CHAT_TEMPLATE else None
    )


def apply_template(tokenizer: Any, messages: Sequence[Message], generation: bool) -> str:
    """`messages` rendered by the tokenizer's own chat template (`generation`: then the
    assistant's generation prompt); a template that cannot render them is one line."""
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # jinja's TemplateError, raise_exception(...) of the template
        reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise SelfsupError(
            f"the model's chat template cannot render the conversation: {reason}"
        ) from None


def end_of_turn(tokenizer: Any) -> str:
    """The token that ends an assistant turn in the tokenizer's own template (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, ...): the first special token (or end id of the model's
    generation_config.json) after the answer; else the tokenizer's eos. One line when none.
    Found once per tokenizer, template and eos (every conversation of a dataset asks)."""
    key = (own_template(tokenizer), tokenizer.eos_token, len(tokenizer))
    known = _END_OF_TURN.setdefault(tokenizer, {})
    if key not in known:
        known[key] = _find_end_of_turn(tokenizer)
    return known[key]


_END_OF_TURN: weakref.WeakKeyDictionary[Any, dict[tuple, str]] = weakref.WeakKeyDictionary()


def _find_end_of_turn(tokenizer: Any) -> str:
    probe: list[Message] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Ok"},
    ]
    before, text = (
        apply_template(tokenizer, probe[:1], True),
        apply_template(tokenizer, probe, False),
    )
    answer = text[len(before) :] if text.startswith(before) else text
    tail = answer[answer.find("Ok") + 2 :]
    ends = {
        *tokenizer.all_special_ids,
        *(i for i, t in tokenizer.added_tokens_decoder.items() if t.special),
        *_generation_eos(tokenizer),
    }
    for i in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if i in ends:
            return tokenizer.convert_ids_to_tokens(i)
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise SelfsupError(
        f"the model's chat template ends an assistant turn with {tail!r}, in which the tokenizer "
        "has no special token to stop at, and the tokenizer has no eos token"
    )


def _generation_eos(tokenizer: Any) -> list[int]:
    """The end ids of generation_config.json beside a local tokenizer (none elsewhere)."""
    import json

    path = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return []
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if isinstance(i, int)]


def template_segments(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The conversation rendered by the tokenizer's own template as (text, trained-on) pieces:
    each assistant turn's text is what rendering up to it adds to the rendering before it with
    the generation prompt, up to and including the end-of-turn token."""
    full = apply_template(tokenizer, messages, False)
    end = end_of_turn(tokenizer)
    segments, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], True)
        upto = apply_template(tokenizer, messages[: i + 1], False)
        if len(before) < done or not (upto.startswith(before) and full.startswith(upto)):
            raise SelfsupError(
                "the model's chat template does not render a conversation turn by turn (a turn "
                "changes what it renders before it): selfsup cannot tell its assistant text"
            )
        answer = upto[len(before) :]
        stop = answer.rfind(end)
        stop = len(answer) if stop < 0 else stop + len(end)
        segments += [(full[done : len(before)], False), (answer[:stop], True)]
        done = len(before) + stop
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def chat_segments(messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained-on) pieces in order."""
    segments = []
    for m in messages:
        segments.append((ROLE_MARKERS[m["role"]], False))
        trained = m["role"] == "assistant"
        segments.append((m["content"], trained))
        segments.append((END, trained))
    return segments


def render_prompt(messages: Sequence[Message], tokenizer: Any = None) -> str:
    """The text a model continues to answer: the conversation so far, then ``<ASSISTANT>`` (or,
    for a tokenizer with its own chat template, that template's generation prompt)."""
    if own_template(tokenizer):
        return apply_template(tokenizer, messages, True)
    return "".join(text for text, _ in chat_segments(messages)) + ROLE_MARKERS["assistant"]


def tokenize_chat(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(token ids, trained-on flags): each segment is tokenized on its own, so that no token
    straddles a prompt/answer boundary and the prompt tokens carry no loss. selfsup's markers
    must be special tokens of the tokenizer (one id each); a tokenizer with its own chat template
    renders with it (`template_segments`)."""
    from selfsup.core.tokenizer import encode_text

    ids: list[int] = []
    trained: list[bool] = []
    if own_template(tokenizer):
        for text, is_trained in template_segments(tokenizer, messages):
            piece = encode_text(tokenizer, text, what=f"the conversation text {text[:40]!r}")
            ids.extend(piece)
            trained.extend([is_trained] * len(piece))
        return ids, trained
    for text, is_trained in chat_segments(messages):
        if text in CHAT_TOKENS:
            piece = tokenizer.encode(text, add_special_tokens=False)
        else:  # a clear error for characters a character-level vocabulary lacks
            piece = encode_text(tokenizer, text, what=f"the conversation text {text[:40]!r}")
        if text in CHAT_TOKENS and len(piece) != 1:
            raise SelfsupError(
                f"the tokenizer splits the chat marker {text} into {len(piece)} tokens: "
                "add the chat markers as special tokens (selfsup lm sft does this)"
            )
        ids.extend(piece)
        trained.extend([is_trained] * len(piece))
    return ids, trained
