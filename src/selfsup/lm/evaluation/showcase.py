"""What a finished language run shows a person (read by `selfsup report`): a GPT's samples, a
BERT's guesses for masked words in held-out sentences."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from selfsup.core.errors import SelfsupError
from selfsup.core.run import atomic_write_text

SAMPLES = "samples.txt"
FILL_MASK = "fill_mask.json"


def write_gpt_samples(run: Path, count: int = 3, tokens: int = 200, seed: int = 0) -> Path:
    """RUN/samples.txt: `count` samples of `tokens` tokens from nothing (temperature 0.8,
    top-k 200, as `selfsup lm generate`), separated by a rule."""
    from selfsup.lm.models.gpt import generate_text

    texts = generate_text(run, "", tokens, 0.8, 200, count, seed)
    path = run / SAMPLES
    atomic_write_text(path, "\n---------------\n".join(t.strip("\n") for t in texts) + "\n")
    return path


def held_out_sentences(texts: list[str], count: int = 4) -> list[str]:
    """`count` lines of 6 to 20 words, evenly spaced over the last 10% of the corpus (the part
    pretraining validates on)."""
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    candidates = [ln for ln in lines[int(len(lines) * 0.9) :] if 6 <= len(ln.split()) <= 20]
    return candidates[:: max(1, len(candidates) // count)][:count]


def mask_middle_token(tokenizer: Any, sentence: str) -> tuple[str, str] | None:
    """(the sentence with its middle alphabetic token replaced by the mask token, that token's
    text): one token, whatever the tokenizer (a character, a word piece, a word)."""
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    order = sorted(range(len(ids)), key=lambda i: abs(i - len(ids) // 2))
    place = next((i for i in order if re.fullmatch(r"\s?[A-Za-z]+", pieces[i])), None)
    if place is None:
        return None
    before, after = tokenizer.decode(ids[:place]), tokenizer.decode(ids[place + 1 :])
    space = " " if pieces[place].startswith(" ") else ""
    return f"{before}{space}{tokenizer.mask_token}{after}", pieces[place].strip()


def write_fill_mask_examples(run: Path, texts: list[str], top_k: int = 5) -> Path | None:
    """RUN/fill_mask.json: the model's `top_k` guesses for one masked token in each of a few
    held-out sentences, beside the true token (None when no sentence qualifies)."""
    from transformers.utils import logging

    from selfsup.core.tokenizer import load_tokenizer
    from selfsup.lm.models.bert import fill_mask

    logging.disable_progress_bar()  # "Loading weights" once per sentence says nothing
    tokenizer = load_tokenizer(run / "hf")
    rows: list[dict[str, Any]] = []
    for sentence in held_out_sentences(texts):
        masked = mask_middle_token(tokenizer, sentence)
        if masked is None:
            continue
        try:
            guesses = fill_mask(run, masked[0], top_k)[0]
        except SelfsupError:  # e.g. a character the tokenizer never saw: skip the sentence
            continue
        rows.append({"text": masked[0], "answer": masked[1], "candidates": guesses})
    if not rows:
        return None
    path = run / FILL_MASK
    atomic_write_text(path, json.dumps(rows, indent=2) + "\n")
    return path
