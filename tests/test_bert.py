"""BERT: masking statistics, next-sentence pairs, a short run that learns, the HF round trip."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.models.bert import (
    IGNORE,
    IS_NEXT,
    NOT_NEXT,
    BertModule,
    Options,
    SentenceFinder,
    build,
    mask_tokens,
    pack_pair,
)
from selfsup.lm.training.pretrain import lm_config, pretrain_lm

SHAKESPEARE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
)


def test_masking_statistics_on_a_large_sample() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 1000, 4
    ids = torch.randint(5, vocab, (400, 500), generator=g)
    ids[:, 0], ids[:, -50:] = 2, 0  # [CLS] first, [PAD] at the end
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0], special[:, -50:] = True, True
    replacements = torch.arange(5, vocab)
    inputs, labels = mask_tokens(ids, special, mask_id, replacements, g, prob=0.15)

    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], ids[chosen])
    assert not chosen[special].any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen tokens change
    n = chosen.sum().item()
    assert n / (~special).sum().item() == pytest.approx(0.15, abs=0.003)
    masked = (inputs[chosen] == mask_id).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    random = 1 - masked - kept
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / len(replacements), abs=0.01)
    assert random == pytest.approx(0.1, abs=0.01)
    swapped = inputs[chosen & (inputs != mask_id) & (inputs != ids)]
    assert swapped.min() >= 5  # random replacements are never special tokens


NEWLINE, EOS = 1, 2


def corpus_of_lines(paragraphs: list[int]) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Paragraphs of numbered lines; line k is [100 + k] * (1 + k % 3); returns the ids and
    {line number: (paragraph, position in it)}."""
    ids, where, k = [NEWLINE], {}, 0
    for p, count in enumerate(paragraphs):
        for position in range(count):
            ids += [100 + k] * (1 + k % 3) + [NEWLINE]
            where[k] = (p, position)
            k += 1
        ids += [NEWLINE] if p % 2 else [EOS]  # a blank line or a document boundary
    return np.array(ids, dtype=np.uint16), where


def test_next_sentence_pairs_are_labelled_right_half_and_half() -> None:
    rng = np.random.default_rng(0)
    ids, where = corpus_of_lines(list(rng.integers(1, 6, size=300)))
    finder = SentenceFinder(breaks={NEWLINE}, stops={EOS}, window=64)
    labels = []
    for _ in range(4000):
        (a0, a1), (b0, b1), label = finder.sentence_pair(ids, rng)
        a, b = int(ids[a0]) - 100, int(ids[b0]) - 100
        assert np.all(ids[a0:a1] == 100 + a) and a1 - a0 == 1 + a % 3  # whole lines
        assert np.all(ids[b0:b1] == 100 + b) and b1 - b0 == 1 + b % 3
        if label == IS_NEXT:  # the next line of the same paragraph
            assert b == a + 1 and where[b][0] == where[a][0]
        else:
            assert b != a + 1
        labels.append(label)
    assert np.mean(np.array(labels) == NOT_NEXT) == pytest.approx(0.5, abs=0.03)


def test_pack_pair_cuts_the_longer_sentence_and_sets_token_types() -> None:
    ids, types = pack_pair(np.array([5, 6, 7, 8, 9]), np.array([10, 11]), 8, cls=2, sep=3)
    assert ids == [2, 5, 6, 7, 3, 10, 11, 3] and types == [0] * 5 + [1] * 3


def test_a_corpus_without_sentence_pairs_is_one_line(tmp_path: Path) -> None:
    corpus = tmp_path / "one-line.txt"
    corpus.write_text("one line per paragraph\n\n" * 200)
    with pytest.raises(SelfsupError, match="too few sentence pairs"):
        pretrain_lm(model="bert", data=str(corpus), tokenizer="char", out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is missing (../shared/data beside the repository)")
    folder = tmp_path_factory.mktemp("bert")
    corpus = folder / "shakespeare.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:150_000])
    return pretrain_lm(
        lm_config(
            "bert",
            data=str(corpus),
            tokenizer="char",
            steps=150,
            batch_size=32,
            lr=2e-3,
            warmup_steps=20,
            eval_interval=75,
            eval_batches=5,
            final_eval_batches=20,
            progress=False,
            out=str(folder / "run"),
        ),
        Options(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, max_length=48),
    )


def test_short_run_beats_the_most_frequent_token(bert_run: Path) -> None:
    results = json.loads((bert_run / "results.json").read_text())
    kept = results[results["kept"]]
    # Chance: always predicting the validation text's most frequent character (" ", ~15%).
    tokens = np.load(bert_run / "tokens.npy")
    val = tokens[int(len(tokens) * 0.9) :]
    newline = json.loads((bert_run / "tokenizer.json").read_text())["model"]["vocab"]["\n"]
    counts = np.bincount(val[val != newline])
    chance = counts.max() / counts.sum()
    assert kept["mlm_acc"] > chance + 0.05, (kept, chance)
    assert 0 <= kept["nsp_acc"] <= 1


def test_hf_export_predicts_the_same_tokens(bert_run: Path, capsys: pytest.CaptureFixture):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(bert_run / "hf"), local_files_only=True)
    hf_model = AutoModelForMaskedLM.from_pretrained(str(bert_run / "hf"), local_files_only=True)
    results = json.loads((bert_run / "results.json").read_text())
    checkpoint = (
        bert_run / "checkpoints" / f"{'best' if results['kept'] == 'best' else 'last'}.ckpt"
    )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module: BertModule = build(lm_config("bert"), _options(bert_run), hf_tokenizer, None)
    module.load_state_dict(state)

    text = "Before we pro[MASK]eed, hear me [MASK]peak."
    encoded = hf_tokenizer(text, return_tensors="pt")
    assert encoded["input_ids"][0, 0] == hf_tokenizer.cls_token_id  # [CLS] ... [SEP] added
    with torch.no_grad():
        ours = module.model.eval()(**encoded).prediction_logits
        theirs = hf_model.eval()(**encoded).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    places = encoded["input_ids"][0] == hf_tokenizer.mask_token_id
    expected = [hf_tokenizer.decode([i]) for i in theirs[0, places].argmax(-1).tolist()]

    assert main(["lm", "fill-mask", str(bert_run), text, "--top-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[MASK] 1:" and out[4] == "[MASK] 2:"
    top = [ast.literal_eval(out[i].rsplit(maxsplit=1)[0].strip()) for i in (1, 5)]
    assert top == expected
    assert main(["lm", "fill-mask", str(bert_run), "no mask here"]) == 2
    assert "no [MASK] token" in capsys.readouterr().err


def test_init_from_a_local_checkpoint(bert_run: Path, tmp_path: Path) -> None:
    run = pretrain_lm(
        lm_config(
            "bert",
            data=str(bert_run / ".." / "shakespeare.txt"),
            init=str(bert_run),
            steps=1,
            eval_interval=1,
            eval_batches=1,
            final_eval_batches=1,
            progress=False,
            out=str(tmp_path / "again"),
        ),
        Options(),
    )
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 1


def _options(run: Path) -> Options:
    import yaml

    return Options(**yaml.safe_load((run / "config.yaml").read_text())["options"])


def test_sentence_pairs_follow_the_paragraphs_of_an_indented_text(tmp_path: Path) -> None:
    """Byte-level BPE merges "\\n\\n" and the next line's indentation into one token: a
    paragraph break all the same. No IsNext pair may cross one, and a NotNext sentence comes
    from another document (the corpus has several)."""
    from selfsup.core.tokenizer import train_tokenizer
    from selfsup.lm.data.corpus import encode_corpus
    from selfsup.lm.models.bert import SPECIAL_TOKENS

    rng = np.random.default_rng(0)
    words = ["king", "crown", "sword", "night", "storm", "rose", "ghost", "river"]
    where, documents = {}, []
    for d in range(4):
        paragraphs = []
        for p in range(12):
            lines = []
            for k in range(int(rng.integers(1, 5))):
                line = f"{words[(d + p + k) % 8]} of {d} and {p} and {k} speaks"
                where[line] = (d, p, k)
                lines.append("    " + line + ("." if k % 2 else ","))
            paragraphs.append("\n".join(lines))
        documents.append("\n\n".join(paragraphs) + "\n")
    tokenizer = train_tokenizer(documents, "bpe", 400, special_tokens=SPECIAL_TOKENS)
    merged = [t for t in tokenizer.get_vocab() if t.count("Ċ") >= 2 and not t.strip("ĊĠ")]
    assert merged  # the case at stake: paragraph breaks merged with indentation into one token
    module = build(lm_config("bert"), Options(max_length=48), tokenizer, None)
    ids = encode_corpus(tokenizer, documents, tmp_path / "tokens.npy")

    def sentence(span: tuple[int, int]) -> tuple[int, int, int]:
        text = tokenizer.decode(ids[span[0] : span[1]].tolist())
        assert "\n" not in text, text  # one whole line
        return where[text.strip().rstrip(".,")]

    labels = []
    for _ in range(1000):
        a, b, label = module.finder.sentence_pair(ids, rng)
        (da, pa, ka), (db, pb, kb) = sentence(a), sentence(b)
        if label == IS_NEXT:
            assert (db, pb, kb) == (da, pa, ka + 1)  # the next line of the same paragraph
        else:
            assert db != da  # another document
        labels.append(label)
    assert np.mean(np.array(labels) == NOT_NEXT) == pytest.approx(0.5, abs=0.05)


def test_the_exported_tokenizer_gives_a_pair_its_segment_ids(bert_run: Path) -> None:
    """Reloaded from disk, the tokenizer encodes a sentence pair as training packed it
    (`pack_pair`: segment 0 for [CLS] A [SEP], 1 for B [SEP]), so the model sees the same
    input and gives the same logits."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bert_run / "hf"), local_files_only=True)
    model = AutoModelForMaskedLM.from_pretrained(str(bert_run / "hf"), local_files_only=True)
    a, b = "First Citizen:", "Hear me speak."  # within the 48 positions
    encoded = tokenizer(a, b, return_tensors="pt")
    ids_a = tokenizer.encode(a, add_special_tokens=False)
    ids_b = tokenizer.encode(b, add_special_tokens=False)
    ids, types = pack_pair(ids_a, ids_b, 1000, tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert encoded["input_ids"][0].tolist() == ids
    assert "token_type_ids" in encoded and encoded["token_type_ids"][0].tolist() == types
    with torch.no_grad():
        logits = model.eval()(**encoded).logits
        packed = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
        no_types = model(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(logits, packed)
    assert (logits - no_types).abs().max() > 1e-3  # segment ids matter to the model


def test_held_out_sentences_come_from_the_corpus_tail() -> None:
    from selfsup.lm.evaluation.showcase import held_out_sentences

    lines = [f"line {i} has six words here" for i in range(100)]
    lines[95] = "too short"
    picked = held_out_sentences(["\n".join(lines)], count=4)
    # the last 10 lines less the short one: 90..99 without 95, every 9 // 4 = 2nd
    assert picked == [lines[i] for i in (90, 92, 94, 97)]


def test_a_bert_run_leaves_fill_mask_examples_for_its_report(bert_run: Path) -> None:
    from selfsup.lm.evaluation.showcase import write_fill_mask_examples

    text = (bert_run.parent / "shakespeare.txt").read_text()
    lines = {line.strip() for line in text.splitlines()}
    path = write_fill_mask_examples(bert_run, [text], top_k=3)
    rows = json.loads(path.read_text())
    assert rows
    for row in rows:
        assert row["text"].count("[MASK]") == 1 and row["answer"].isalpha()
        assert row["text"].replace("[MASK]", row["answer"]) in lines  # one char put back
        probabilities = [p for _, p in row["candidates"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1
