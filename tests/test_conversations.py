"""Conversation and ranking files, the chat template, and the assistant-only loss mask."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from selfsup.core.errors import SelfsupError
from selfsup.lm.data.conversations import (
    CHAT_TOKENS,
    parse_conversation,
    read_conversations,
    read_rankings,
    render_prompt,
    tokenize_chat,
)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE with the chat markers as special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(CHAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        ["how are you? fine, thanks. what is two plus two? four."] * 20, trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=list(CHAT_TOKENS)
    )


def test_both_formats_give_the_same_messages(tmp_path):
    path = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "hi", "completion": "hello"},
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            },
        ],
    )
    first, second = read_conversations(path)
    assert first == second[1:]
    assert render_prompt(first[:1]) == "<USER>hi<END><ASSISTANT>"


def test_prompt_tokens_carry_no_loss(tokenizer):
    messages = [
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four."},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine, thanks."},
    ]
    ids, trained = tokenize_chat(tokenizer, messages)
    assert len(ids) == len(trained)
    rendered = tokenizer.decode(ids)
    assert rendered == "".join(f"<{m['role'].upper()}>{m['content']}<END>" for m in messages)
    answer_text = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t])
    assert answer_text == "four.<END>fine, thanks.<END>"
    prompt_text = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if not t])
    assert (
        prompt_text
        == "<USER>what is two plus two?<END><ASSISTANT><USER>how are you?<END><ASSISTANT>"
    )


def test_markers_must_be_single_tokens():
    class CharTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    with pytest.raises(SelfsupError, match="splits the chat marker <USER>"):
        tokenize_chat(CharTokenizer(), [{"role": "user", "content": "a"}])


@pytest.mark.parametrize(
    "record, words",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "needs a role"),
        ({"messages": [{"role": "user", "content": " "}]}, "'content' must be a non-empty"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"prompt": "x"}, "expected a 'messages' list"),
    ],
)
def test_bad_conversations_say_where_and_what(record, words):
    with pytest.raises(SelfsupError, match=words):
        parse_conversation(record, "f.jsonl:3")


def test_bad_files(tmp_path):
    with pytest.raises(SelfsupError, match="no such file"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(SelfsupError, match=r"bad.jsonl:2: not valid JSON"):
        read_conversations(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SelfsupError, match="no conversations"):
        read_conversations(tmp_path / "empty.jsonl")


def test_rankings_and_pairs(tmp_path):
    path = _write_jsonl(
        tmp_path / "rank.jsonl",
        [
            {"prompt": "p", "completions": ["a", "b", "c", "d"], "ranking": "D > C > A = B"},
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
        ],
    )
    first, second = read_rankings(path)
    assert first.tiers == ((3,), (2,), (0, 1))
    assert second.completions == ("good", "bad") and second.tiers == ((0,), (1,))
    _write_jsonl(path, [{"prompt": "p", "completions": ["a", "b"], "ranking": "A > C"}])
    with pytest.raises(SelfsupError, match=r"rank.jsonl:1: ranking 'A > C' .*unknown C"):
        read_rankings(path)
