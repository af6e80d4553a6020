"""BERT: masked-language modelling plus next-sentence prediction (Devlin et al., 2019).

Two pretext tasks on a pair of sentences `[CLS] A [SEP] B [SEP]`:
- masked words: 15% of the non-special tokens are chosen; of those 80% become [MASK], 10% a
  random token, 10% stay unchanged; the model predicts the original token at each chosen place.
- next sentence: half the pairs have B = the sentence after A ("IsNext", label 0, transformers'
  convention), half a random sentence of the corpus ("NotNext", label 1); the [CLS] vector
  predicts which.

Sentences are lines: a pair (A, B) is two consecutive non-empty lines of one paragraph (a blank
or whitespace-only line or a document boundary separates paragraphs), judged on the text the
tokens stand for: byte-level BPE merges a paragraph break and the next line's indentation into
one token ("\\n\\n   "), which still ends the paragraph. A random B (NotNext) comes from another
document where the corpus has several (BERT's rule), else from anywhere but A's next line. In
tinyshakespeare a paragraph is one speech, "FIRST CITIZEN:" followed by its lines, so a true pair
is a speaker and their first line or two successive lines of a speech. Pairs are found from
random places in the memory-mapped token ids, so longer sentences are drawn a little more often
than short ones.

The model is transformers' BertForPreTraining (small by default), exported to RUN/hf with its
tokenizer: AutoModelForMaskedLM + AutoTokenizer load it. The tokenizer is byte-level BPE, as
RoBERTa's: "[MASK]" absorbs the space before it, so "the [MASK] ." asks for a word with its
leading space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from tokenizers.processors import TemplateProcessing
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.lm.models.base import LanguageModule
from selfsup.lm.models.hf import hf_dir, local_config, local_weights
from selfsup.lm.options import LMConfig

IGNORE = -100  # label of the positions that are not predicted (transformers' convention)
IS_NEXT, NOT_NEXT = 0, 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>")
MAX_TRIES = 200  # random places tried per pair before concluding the text has no pairs


# --- the two pretext tasks, on tensors of token ids -------------------------------------------


def mask_tokens(
    ids: Tensor,
    special: Tensor,
    mask_id: int,
    replacements: Tensor,
    g: torch.Generator,
    prob: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """(inputs, labels) for masked-language modelling.

    Each position where `special` is False is chosen with probability `prob`; a chosen token
    becomes `mask_id` (80%), a random token of `replacements` (10%) or stays (10%). `labels`
    holds the original id at chosen positions and IGNORE elsewhere. Written here rather than
    with transformers' DataCollatorForLanguageModeling so that every draw comes from the
    step's generator and random replacements are never special tokens.
    """
    chosen = (torch.rand(ids.shape, generator=g, device=ids.device) < prob) & ~special
    labels = torch.where(chosen, ids, IGNORE)
    action = torch.rand(ids.shape, generator=g, device=ids.device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    picks = torch.randint(len(replacements), ids.shape, generator=g, device=ids.device)
    inputs = torch.where(to_mask, mask_id, ids)
    inputs = torch.where(to_random, replacements.to(ids.device)[picks], inputs)
    return inputs, labels


def pack_pair(a: np.ndarray, b: np.ndarray, max_length: int, cls: int, sep: int) -> tuple:
    """(ids, token types) of `[CLS] a [SEP] b [SEP]`, the longer of a and b cut first."""
    a, b = np.asarray(a).tolist(), np.asarray(b).tolist()
    while len(a) + len(b) > max_length - 3:
        (a if len(a) >= len(b) else b).pop()
    ids = [cls, *a, sep, *b, sep]
    return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1)


class SentenceFinder:
    """Sentences (lines) of a token-id array, found around random places, split as the text is.

    A line ends at a newline and a paragraph at a blank (or whitespace-only) line or a document
    separator, judged from the text the tokens stand for: `breaks` maps each whitespace-only
    token holding newlines to how many it holds (a byte-level BPE merges "\\n\\n " into one
    token: that is a paragraph break, not a line break), `spaces` are the whitespace-only tokens
    without one, `stops` the document separators. Looks at most `window` tokens ahead, so longer
    sentences are cut.
    """

    def __init__(
        self,
        breaks: dict[int, int] | set[int],
        stops: set[int],
        window: int,
        spaces: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        counts = dict(breaks) if isinstance(breaks, dict) else dict.fromkeys(breaks, 1)
        counts.update(dict.fromkeys(stops, 1 << 20))  # a separator ends a paragraph
        self.breaks = np.array(sorted(counts), dtype=np.int64)
        self.stops = np.array(sorted(stops), dtype=np.int64)
        self.whitespace = np.array(sorted(set(counts) | set(spaces)), dtype=np.int64)
        self.newlines = np.zeros(max(counts, default=0) + 1, dtype=np.int64)
        for token, count in counts.items():
            self.newlines[token] = count
        self.window = window
        self._documents: dict[int, tuple[int, np.ndarray]] = {}

    def lines(self, ids: np.ndarray, start: int) -> list[tuple[int, int, bool]]:
        """(start, end, paragraph ends here) of the whole lines after the first line break at or
        after `start`, within the window."""
        piece = np.asarray(ids[start : start + self.window]).astype(np.int64)
        white = np.isin(piece, self.whitespace).astype(np.int8)
        newlines = self.newlines[np.minimum(piece, len(self.newlines) - 1)]
        newlines[piece >= len(self.newlines)] = 0
        edges = np.diff(np.concatenate([[0], white, [0]]))
        run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        total = np.concatenate([[0], np.cumsum(newlines)])
        counts = total[run_ends] - total[run_starts]
        separators = [(s, e, n) for s, e, n in zip(run_starts, run_ends, counts, strict=True) if n]
        found = []
        for (_, e0, _), (s1, e1, n1) in zip(separators, separators[1:], strict=False):
            if e1 >= len(piece):  # the whitespace may go on past the window: unknown
                break
            found.append((start + int(e0), start + int(s1), bool(n1 >= 2)))
        return found

    def pair(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(A start, A end, B start, B end) of two consecutive lines of one paragraph."""
        for _ in range(MAX_TRIES):
            lines = self.lines(ids, int(rng.integers(0, max(1, len(ids) - 2))))
            for (s, e, last), (s2, e2, _) in zip(lines, lines[1:], strict=False):
                if e > s and e2 > s2 and not last:
                    return s, e, s2, e2
        raise SelfsupError(NO_PAIRS)

    def document_starts(self, ids: np.ndarray) -> np.ndarray:
        """Where each document of `ids` starts (after a separator), found once per array."""
        key = id(ids)
        if key not in self._documents or self._documents[key][0] != len(ids):
            found = [np.array([0])]
            for s in range(0, len(ids), 1 << 24):
                chunk = np.asarray(ids[s : s + (1 << 24)])
                found.append(s + np.flatnonzero(np.isin(chunk, self.stops)) + 1)
            starts = np.unique(np.concatenate(found))
            self._documents[key] = (len(ids), starts[starts < len(ids)])
        return self._documents[key][1]

    def line(
        self, ids: np.ndarray, rng: np.random.Generator, not_at: int, apart_from: int | None = None
    ) -> tuple[int, int]:
        """(start, end) of a random non-empty line that does not start at `not_at`; where `ids`
        holds several documents, from another document than the one around `apart_from`
        (BERT's rule for a random next sentence)."""
        starts = self.document_starts(ids) if apart_from is not None else np.array([0])
        document = np.searchsorted(starts, apart_from or 0, side="right")
        for _ in range(MAX_TRIES):
            for s, e, _ in self.lines(ids, int(rng.integers(0, max(1, len(ids) - 2)))):
                elsewhere = len(starts) < 2 or np.searchsorted(starts, s, "right") != document
                if e > s and s != not_at and elsewhere:
                    return s, e
        for _ in range(MAX_TRIES):  # one document dwarfs the others: any other line will do
            for s, e, _ in self.lines(ids, int(rng.integers(0, max(1, len(ids) - 2)))):
                if e > s and s != not_at:
                    return s, e
        raise SelfsupError(NO_PAIRS)

    def sentence_pair(
        self, ids: np.ndarray, rng: np.random.Generator
    ) -> tuple[tuple[int, int], tuple[int, int], int]:
        """(A span, B span, label): B is A's next line (IS_NEXT) or, with probability 1/2, a
        random line of another document where there are several, else of the corpus other
        than that one (NOT_NEXT)."""
        a0, a1, b0, b1 = self.pair(ids, rng)
        if rng.random() < 0.5:
            return (a0, a1), (b0, b1), IS_NEXT
        return (a0, a1), self.line(ids, rng, not_at=b0, apart_from=a0), NOT_NEXT


NO_PAIRS = (
    "--data has too few sentence pairs for next-sentence prediction: BERT needs paragraphs "
    "of at least two consecutive non-empty lines in both the training and the validation split"
)


# --- a kind of `selfsup lm pretrain` ---------------------------------------------------------


@dataclass
class Options:
    """BERT options of `selfsup lm pretrain bert` (a small BERT; base is 768 × 12 × 12)."""

    hidden_size: int = option(128, "width of the transformer", check=">=1")
    num_layers: int = option(2, "transformer layers", check=">=1")
    num_heads: int = option(2, "attention heads", check=">=1")
    intermediate_size: int = option(512, "width of the feed-forward layers", check=">=1")
    max_length: int = option(64, "longest pair in tokens, [CLS] and [SEP]s included", check=">=5")
    dropout: float = option(0.1, "dropout probability", check="[0,1)")
    mask_prob: float = option(0.15, "fraction of the tokens chosen for prediction", check="(0,1)")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """BERT's conventions on a trained tokenizer: `[CLS] A [SEP] (B [SEP])` added on encoding,
    token types returned, and, for byte-level BPE, "[MASK]" absorbing the space before it (as
    RoBERTa's <mask>)."""
    for token in ("[CLS]", "[SEP]", "[MASK]", "[PAD]"):
        if token not in tokenizer.get_vocab():
            raise SelfsupError(f"the tokenizer has no {token} token, which BERT needs")
    pre_tokenizer = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") == "ByteLevel":  # words carry their leading space
        mask = AddedToken("[MASK]", lstrip=True, special=True, normalized=False)
        tokenizer.add_special_tokens({"mask_token": mask})
    cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    # ... and saved: tokenizer_config.json keeps init_kwargs, not the attribute, so a tokenizer
    # reloaded with AutoTokenizer would drop the segment ids of a sentence pair
    tokenizer.init_kwargs["model_input_names"] = list(tokenizer.model_input_names)
    return tokenizer


def load_init(path: str) -> Any:
    """A local BERT checkpoint (a run directory, its hf/ folder, or any BERT folder)."""
    from transformers import BertForPreTraining

    folder = hf_dir(path)
    config = local_config(folder, "--init", "bert", "BERT")
    model = local_weights(folder, BertForPreTraining, "--init")
    model.vocab_size = config.vocab_size  # what pretrain_lm checks against the tokenizer
    return model


def build(config: LMConfig, options: Options, tokenizer: Any, init: Any) -> BertModule:
    """The BERT to train (`init`: a checkpoint from `load_init`, which fixes the architecture);
    `options` are in their declared ranges (`pretrain_lm` checks them)."""
    from transformers import BertConfig, BertForPreTraining

    tokenizer = prepare_tokenizer(tokenizer)
    if init is not None:  # the checkpoint fixes the architecture
        model, c = init, init.config
        options = Options(
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            max_length=min(options.max_length, c.max_position_embeddings),
            dropout=options.dropout,
            mask_prob=options.mask_prob,
        )
    else:
        if options.hidden_size % options.num_heads:
            raise SelfsupError(
                f"--hidden-size {options.hidden_size} must be a multiple of --num-heads "
                f"{options.num_heads}"
            )
        model = BertForPreTraining(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=options.hidden_size,
                num_hidden_layers=options.num_layers,
                num_attention_heads=options.num_heads,
                intermediate_size=options.intermediate_size,
                max_position_embeddings=options.max_length,
                hidden_dropout_prob=options.dropout,
                attention_probs_dropout_prob=options.dropout,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return BertModule(config, options, model, tokenizer)


class BertModule(LanguageModule):
    """Masked words + next sentence on pairs of lines; reports both accuracies."""

    Options = Options
    help = "BERT: masked-language modelling plus next-sentence prediction (Devlin et al., 2019)."
    defaults = {"tokenizer": "bpe", "vocab_size": 4096, "batch_size": 32, "lr": 5e-4,
                "weight_decay": 0.01, "steps": 2000}  # fmt: skip
    SPECIAL_TOKENS = SPECIAL_TOKENS
    load_init = staticmethod(load_init)
    build = staticmethod(build)

    def __init__(self, config: LMConfig, options: Options, model: Any, tokenizer: Any) -> None:
        super().__init__(config, options, model.config.vocab_size)
        self.model = model
        self.cls, self.sep, self.pad, self.mask = tokenizer.convert_tokens_to_ids(
            ["[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        )
        special = set(tokenizer.all_special_ids)
        vocab = len(tokenizer)
        self.register_buffer(
            "replacements", torch.tensor([i for i in range(vocab) if i not in special])
        )
        self.register_buffer("special", torch.zeros(self.vocab_size, dtype=torch.bool))
        self.special[list(special)] = True
        breaks, spaces = _whitespace_ids(tokenizer)
        self.finder = SentenceFinder(
            breaks=breaks,
            stops={tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set(),
            window=4 * options.max_length,
            spaces=spaces,
        )
        self.has_line_breaks = bool(breaks)

    def check_data(self, train_ids: np.ndarray, val_ids: np.ndarray) -> None:
        if not self.has_line_breaks:
            raise SelfsupError(
                "the tokenizer has no line-break token: BERT's sentence pairs are lines "
                "(use --tokenizer bpe or char)"
            )
        rng = np.random.default_rng(0)
        for ids in (train_ids, val_ids):
            self.finder.pair(ids, rng)  # raises NO_PAIRS when there is none

    def make_batch(self, ids: np.ndarray, rng: np.random.Generator, batch_size: int) -> dict:
        """Sentence pairs (half true, half random), packed, padded, masked: BertForPreTraining's
        inputs plus `labels` and `next_sentence_label`."""
        rows, types, nsp = [], [], []
        for _ in range(batch_size):
            (a0, a1), (b0, b1), label = self.finder.sentence_pair(ids, rng)
            pair, type_ids = pack_pair(
                ids[a0:a1], ids[b0:b1], self.options.max_length, self.cls, self.sep
            )
            rows.append(pair)
            types.append(type_ids)
            nsp.append(label)
        return self.collate(rows, types, nsp, int(rng.integers(1 << 62)))

    def collate(self, rows: list, types: list, nsp: list, seed: int) -> dict[str, Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        token_types = torch.zeros_like(ids)
        for i, (r, t) in enumerate(zip(rows, types, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            token_types[i, : len(t)] = torch.tensor(t)
        g = torch.Generator().manual_seed(seed)
        inputs, labels = mask_tokens(
            ids,
            self.special.cpu()[ids],
            self.mask,
            self.replacements.cpu(),
            g,
            self.options.mask_prob,
        )
        return {
            "input_ids": inputs,
            "token_type_ids": token_types,
            "attention_mask": (ids != self.pad).long(),
            "labels": labels,
            "next_sentence_label": torch.tensor(nsp),
        }

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(**batch)
        chosen = batch["labels"] != IGNORE
        predicted = out.prediction_logits.argmax(-1)
        mlm_acc = (predicted[chosen] == batch["labels"][chosen]).float().mean()
        nsp_acc = (out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).float()
        return out.loss, {"mlm_acc": mlm_acc, "nsp_acc": nsp_acc.mean()}

    def export(self, run: Path, tokenizer: Any) -> None:
        """RUN/hf: BertForPreTraining + tokenizer, for AutoModelForMaskedLM / AutoTokenizer."""
        from selfsup.lm.models.hf import save_hf

        save_hf(run, self.model, tokenizer)


def _whitespace_ids(tokenizer: Any) -> tuple[dict[int, int], set[int]]:
    """({token: newlines in it} of the whitespace-only tokens holding a newline (e.g. "\\n",
    byte-level "Ċ", "ĊĊĠ"), the whitespace-only tokens without one)."""
    breaks, spaces = {}, set()
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text and not text.strip():
            if "\n" in text:
                breaks[i] = text.count("\n")
            else:
                spaces.add(i)
    return breaks, spaces


# --- using a trained model -----------------------------------------------------------------


@torch.no_grad()
def fill_mask(run: str | Path, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, the `top_k` likeliest tokens and their probabilities, from
    the run's hf/ export loaded with AutoModelForMaskedLM + AutoTokenizer."""
    from transformers import AutoModelForMaskedLM

    from selfsup.core.tokenizer import encode_text
    from selfsup.lm.models.hf import load_tokenizer_and

    if top_k < 1:
        raise SelfsupError(f"--top-k must be at least 1, got {top_k}")
    tokenizer, model = load_tokenizer_and(run, AutoModelForMaskedLM)
    mask = tokenizer.mask_token
    if mask is None or mask not in text:
        raise SelfsupError(f"TEXT has no {mask or '[MASK]'} token to fill, e.g. 'the [MASK] .'")
    encode_text(tokenizer, text.replace(mask, ""), "TEXT")  # one line naming unknown characters
    encoded = tokenizer(text, return_tensors="pt")
    if encoded["input_ids"].shape[1] > model.config.max_position_embeddings:
        raise SelfsupError(
            f"TEXT is {encoded['input_ids'].shape[1]} tokens long, more than the model's "
            f"{model.config.max_position_embeddings} positions; shorten it"
        )
    logits = model.eval()(**encoded).logits[0]
    places = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten()
    results = []
    for place in places.tolist():
        top = logits[place].softmax(-1).topk(min(top_k, logits.shape[-1]))
        words = [tokenizer.decode([i]) for i in top.indices.tolist()]
        results.append(list(zip(words, top.values.tolist(), strict=True)))
    return results
