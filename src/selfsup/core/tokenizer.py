"""Character-level and byte-level BPE tokenizers, built with Hugging Face `tokenizers`.

A trained tokenizer is a `transformers` fast tokenizer: `save_pretrained(DIR)` writes
`DIR/tokenizer.json`, which `AutoTokenizer.from_pretrained(DIR)` (and `load_tokenizer`) read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from selfsup.core.errors import SelfsupError

if TYPE_CHECKING:  # transformers takes seconds to import: only where a tokenizer is made
    from transformers import PreTrainedTokenizerFast

KINDS = ("char", "bpe")
TOKENIZER_FILE = "tokenizer.json"
# Conventional special tokens and the `transformers` role each one plays.
SPECIAL_ROLES = {
    "[PAD]": "pad_token",
    "[UNK]": "unk_token",
    "[CLS]": "cls_token",
    "[SEP]": "sep_token",
    "[MASK]": "mask_token",
    "<|endoftext|>": "eos_token",
}


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 8192,
    special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Learn a tokenizer from `texts`.

    kind "char": one token per character seen (sorted), special tokens first; `vocab_size`
    is ignored. kind "bpe": byte-level BPE (GPT-2's scheme) with up to `vocab_size` tokens;
    it encodes any text, since all 256 bytes are in its alphabet.
    """
    if kind not in KINDS:
        raise SelfsupError(f"--tokenizer {kind!r} is unknown; expected one of {', '.join(KINDS)}")
    special = list(dict.fromkeys(special_tokens))
    if kind == "char":
        tokenizer = _char_tokenizer(texts, special)
    else:
        minimum = 256 + len(special)
        if vocab_size < minimum:
            raise SelfsupError(
                f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs at least "
                f"{minimum} (256 bytes + {len(special)} special tokens)"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    roles = {SPECIAL_ROLES[t]: t for t in special if t in SPECIAL_ROLES}
    if "eos_token" in roles:
        roles["bos_token"] = roles["eos_token"]  # GPT-2's convention: one end-of-text token
    extra = [t for t in special if t not in SPECIAL_ROLES]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, additional_special_tokens=extra, **roles
    )


def _char_tokenizer(texts: Iterable[str], special: list[str]) -> Tokenizer:
    chars: Counter[str] = Counter()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(special)}
    for char in sorted(chars):
        vocab.setdefault(char, len(vocab))
    unk = "[UNK]" if "[UNK]" in vocab else None
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    # Every character (newlines included) is its own piece; decoding joins them back.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `directory` (its `tokenizer.json`), e.g. a run directory."""
    from transformers import AutoTokenizer

    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise SelfsupError(f"{path} is missing: no tokenizer saved in {directory}")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # tokenizers/transformers raise several types for a damaged file
        raise SelfsupError(f"{path} is not a readable tokenizer ({e.__class__.__name__})") from None


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str, what: str = "text") -> list[int]:
    """Token ids of `text` (no special tokens added); a character the tokenizer cannot encode
    (unknown to a char-level vocabulary, or mapped to its unknown token) is an error naming it.
    """
    try:  # the whole text at once; each character on its own only to name what failed
        ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    except Exception:  # WordLevel without an unknown token raises on unseen characters
        ids = None
    if ids is not None and tokenizer.unk_token_id not in ids:
        return ids
    unknown = sorted({c for c in text if not _encodable(tokenizer, c)})
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:10])
        raise SelfsupError(
            f"{what} has characters the tokenizer cannot encode: {shown}"
            f"{' ...' if len(unknown) > 10 else ''} (the tokenizer knows only its training text's)"
        )
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _encodable(tokenizer: PreTrainedTokenizerFast, char: str) -> bool:
    try:
        ids = tokenizer.backend_tokenizer.encode(char, add_special_tokens=False).ids
    except Exception:  # WordLevel without an unknown token raises on unseen characters
        return False
    return bool(ids) and tokenizer.unk_token_id not in ids
