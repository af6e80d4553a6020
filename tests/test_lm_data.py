"""Corpora and tokenizers: reading text, char/BPE round-trips, memory-mapped token ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from selfsup.core.errors import SelfsupError
from selfsup.core.tokenizer import encode_text, load_tokenizer, train_tokenizer
from selfsup.lm.data import corpus
from selfsup.lm.data.corpus import encode_corpus, load_ids, read_texts, split_ids

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def test_read_txt_folder_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\r\nfile\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
    )
    (tmp_path / "notes.md").write_text("ignored")
    assert read_texts(tmp_path) == ["first file\n", "second\nfile\n", "one", "two"]
    assert read_texts([tmp_path / "a.txt", tmp_path / "a.txt"]) == ["first file\n"] * 2
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert read_texts(tmp_path / "d.jsonl", text_field="body") == ["x"]


def test_corpus_errors_are_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"abc caf" + "é".encode("latin-1") + b" ok")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": 3}\n')
    cases = [
        (empty, "empty"),
        (tmp_path / "missing.txt", "does not exist"),
        (latin, r"byte 7 \(0xe9\)"),
        (bad_json, "line 2"),
    ]
    for path, expected in cases:
        with pytest.raises(SelfsupError, match=expected) as info:
            read_texts(path)
        assert "\n" not in str(info.value)
    with pytest.raises(SelfsupError, match="--encoding"):
        read_texts(latin)
    assert read_texts(latin, encoding="latin-1") == ["abc café ok"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_round_trip_through_auto_tokenizer(kind: str, tmp_path: Path) -> None:
    tokenizer = train_tokenizer([TEXT] * 20, kind, vocab_size=300, special_tokens=["<|endoftext|>"])
    ids = encode_text(tokenizer, TEXT)
    assert tokenizer.decode(ids) == TEXT
    if kind == "char":  # one id per character, in sorted order after the special token
        assert len(ids) == len(TEXT) and len(tokenizer) == 1 + len(set(TEXT))
        assert tokenizer.convert_ids_to_tokens(1) == min(TEXT)
    else:  # merges learned from a repeated text make it shorter than its characters
        assert len(ids) < len(TEXT) / 2
        assert tokenizer.decode(encode_text(tokenizer, "naïve ✓")) == "naïve ✓"  # any bytes
    tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))):
        assert loaded(TEXT)["input_ids"] == ids
        assert loaded.eos_token == "<|endoftext|>"


def test_char_tokenizer_names_characters_it_cannot_encode() -> None:
    tokenizer = train_tokenizer([TEXT], "char")
    with pytest.raises(SelfsupError, match=r"--prompt .*'é' 'ü'"):
        encode_text(tokenizer, "Süé", "--prompt")


def test_encode_corpus_writes_memory_mapped_ids(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 16)  # many chunks: ids must not depend on them
    texts = [TEXT, "Speak.\n" * 5]
    tokenizer = train_tokenizer(texts, "char", special_tokens=["<|endoftext|>"])
    ids = encode_corpus(tokenizer, texts, tmp_path / "ids.npy")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    eos = tokenizer.eos_token_id
    expected = [*encode_text(tokenizer, texts[0]), eos, *encode_text(tokenizer, texts[1]), eos]
    assert ids.tolist() == expected
    assert load_ids(tmp_path / "ids.npy").tolist() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy"]  # no temporary files left
    train, val = split_ids(ids)
    assert len(val) == round(0.1 * len(ids)) and train.tolist() + val.tolist() == expected


def test_ids_dtype_grows_with_the_vocabulary() -> None:
    assert corpus.ids_dtype(65536) == np.uint16 and corpus.ids_dtype(65537) == np.uint32


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is not beside the repo")
def test_tinyshakespeare_char_vocabulary(tmp_path: Path) -> None:
    texts = read_texts(SHAKESPEARE)
    tokenizer = train_tokenizer(texts, "char")
    ids = encode_corpus(tokenizer, texts, tmp_path / "ids.npy")
    assert len(tokenizer) == 65 and len(ids) == 1_115_394
    assert tokenizer.decode(ids[-1000:].tolist()) == texts[0][-1000:]
