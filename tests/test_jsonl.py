"""core.jsonl.json_objects: the one JSONL line reader of captions, corpora and conversations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.core.errors import SelfsupError
from selfsup.core.jsonl import json_objects
from selfsup.image.data.captions import load_captions
from selfsup.lm.data.conversations import read_conversations
from selfsup.lm.data.corpus import read_texts

ODD = "a\u2028b\x85c\u2029d"  # line separators str.splitlines cuts at, legal inside JSON strings


def test_objects_and_their_line_numbers_with_odd_separators_and_crlf() -> None:
    records = [{"text": ODD}, {"n": [1, 2]}, {"text": "last"}]
    lines = [json.dumps(records[0], ensure_ascii=False), "  ", json.dumps(records[1])]
    text = "\r\n".join([*lines, json.dumps(records[2])]) + "\r\n"
    assert list(json_objects(text, "f.jsonl")) == [
        (1, records[0]),
        (3, records[1]),
        (4, records[2]),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", r"f.jsonl:2: not valid JSON \("),
        ("[1, 2]", "f.jsonl:2: expected a JSON object, got list"),
        ("[" * 100_000 + "]" * 100_000, "f.jsonl:2: JSON nested too deeply"),
    ],
)
def test_a_bad_line_is_one_line_naming_it(line: str, message: str) -> None:
    with pytest.raises(SelfsupError, match=message) as info:
        list(json_objects('{"a": 1}\n' + line + "\n", "f.jsonl"))
    assert "\n" not in str(info.value)
    with pytest.raises(SelfsupError, match=r"^f.jsonl, line 2: "):
        list(json_objects('{"a": 1}\n' + line + "\n", "f.jsonl", "{path}, line {line}"))


def test_captions_corpora_and_conversations_keep_odd_separators(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), 9, dtype=np.uint8)).save(tmp_path / "a.png")
    captions = tmp_path / "pairs.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "caption": f"x {ODD}"}, ensure_ascii=False))
    train, _ = load_captions(str(captions), holdout=0)
    assert train.captions == [[" ".join(f"x {ODD}".split())]]
    captions.write_text("{oops\n")
    with pytest.raises(SelfsupError, match=r"pairs.jsonl, line 1: not valid JSON"):
        load_captions(str(captions), holdout=0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": ODD}, ensure_ascii=False) + "\n")
    assert read_texts(corpus) == [ODD]
    chats = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": ODD}, {"role": "assistant", "content": "ok"}]}
    chats.write_text(json.dumps(chat, ensure_ascii=False) + "\n")
    assert read_conversations(chats) == [chat["messages"]]
