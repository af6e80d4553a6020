"""word2vec: noise and subsampling against their formulas, the dynamic window, the loss against a
naive loop, and a short run that puts words of one kind next to each other."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.models.word2vec import (
    WordVectors,
    chunk_pairs,
    keep_probabilities,
    noise_distribution,
    pretrain_word2vec,
    sample_noise,
    sgns_loss,
    skipgram_pairs,
)


def test_noise_is_unigram_to_the_three_quarters_and_sampled_so() -> None:
    counts = torch.tensor([100.0, 10.0, 1.0, 0.0, 50.0])
    weights = [c**0.75 for c in counts.tolist()]
    expected = torch.tensor([w / sum(weights) for w in weights])
    noise = noise_distribution(counts)
    assert torch.allclose(noise, expected, atol=1e-6)
    draws = sample_noise(noise.cumsum(0), (200_000,), torch.Generator().manual_seed(0))
    frequency = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(frequency, expected, atol=0.005), (frequency, expected)
    assert frequency[3] == 0  # a word never seen is never a negative


def test_subsampling_follows_the_word2vec_formula() -> None:
    counts = torch.tensor([0.0, 50_000.0, 5_000.0, 500.0, 5.0])
    total, sample = counts.sum().item(), 1e-3
    keep = keep_probabilities(counts, sample)
    for word in range(1, 5):
        f = counts[word].item() / total
        assert keep[word].item() == pytest.approx(
            min(1.0, (math.sqrt(f / sample) + 1) * sample / f), rel=1e-5
        )
    assert keep[0] == 0 and keep[4] == 1  # the unknown word dropped, a rare word always kept
    assert torch.equal(keep_probabilities(counts, 0.0), (counts > 0).float())
    # Empirically: the share of a frequent word's occurrences that survive is keep[word].
    chunk = torch.tensor([1] * 20_000 + [3] * 20_000)
    kept, _ = chunk_pairs(chunk, keep, 1, torch.Generator().manual_seed(0))
    # every surviving word is a centre once per neighbour (window 1): count centres of word 1
    survivors = (kept == 1).sum().item() / 2
    assert survivors / 20_000 == pytest.approx(keep[1].item(), abs=0.01)


def test_dynamic_window_weights_near_words_more() -> None:
    window, n = 5, 20_000
    centres, contexts = skipgram_pairs(torch.arange(n), window, torch.Generator().manual_seed(0))
    distance = (contexts - centres).abs()
    assert distance.min() >= 1 and distance.max() <= window
    right, left = ((contexts > centres).sum().item(), (contexts < centres).sum().item())
    assert right == pytest.approx(left, rel=0.01)  # both sides, the same window
    # A context at distance d is used when the centre's window b ~ U{1..5} is at least d.
    for d in range(1, window + 1):
        share = (distance == d).sum().item() / (2 * n)
        assert share == pytest.approx((window - d + 1) / window, abs=0.02), d


def test_loss_matches_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    centre, context = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    negatives = torch.randn(4, 2, 3, generator=g)

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    naive = 0.0
    for i in range(4):
        naive -= log_sigmoid(float(centre[i] @ context[i]))
        for k in range(2):
            naive -= log_sigmoid(-float(centre[i] @ negatives[i, k]))
    assert sgns_loss(centre, context, negatives).item() == pytest.approx(naive / 4, rel=1e-5)


KINDS = {
    "animal": ["cat", "dog", "horse", "cow", "sheep", "goat"],
    "food": ["bread", "apple", "rice", "soup", "cheese", "meat"],
    "person": ["man", "woman", "king", "queen", "boy", "girl"],
    "vehicle": ["car", "bus", "train", "boat", "bike", "cart"],
}
TEMPLATES = [
    "the {animal} eats the {food}",
    "a {person} drives the {vehicle}",
    "the {person} feeds a {animal}",
    "the {person} cooks {food}",
    "a {vehicle} carries the {animal}",
]


@pytest.fixture(scope="module")
def kinds_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rnd = random.Random(0)
    lines = []
    for _ in range(3000):
        template = rnd.choice(TEMPLATES)
        lines.append(template.format(**{k: rnd.choice(v) for k, v in KINDS.items()}))
    folder = tmp_path_factory.mktemp("w2v")
    (folder / "kinds.txt").write_text("\n".join(lines) + "\n")
    return pretrain_word2vec(
        data=str(folder / "kinds.txt"),
        dim=32,
        window=3,
        min_count=2,
        epochs=5,
        sample=0.0,  # 30 words, all frequent: keep them all
        optimizer="adam",
        lr=0.03,
        batch_words=1000,
        progress=False,
        out=str(folder / "run"),
    )


def test_short_run_puts_words_of_a_kind_next_to_each_other(kinds_run: Path) -> None:
    vectors = WordVectors(kinds_run)
    same = []
    for words in KINDS.values():
        for word in words:
            found = [w for w, _ in vectors.neighbors(word, k=5)]
            same.append(sum(w in words for w in found) / 5)
    # 29 other words, 5 of them of the same kind: a random top-5 holds ~0.17 of its kind.
    assert sum(same) / len(same) > 0.7, same


def test_run_directory_and_cli(kinds_run: Path, capsys: pytest.CaptureFixture) -> None:
    tensors = load_file(kinds_run / "vectors.safetensors")
    vocab = (kinds_run / "vocab.tsv").read_text().splitlines()
    assert tensors["input"].shape == tensors["output"].shape == (len(vocab), 32)
    assert vocab[0].startswith("[UNK]") and vocab[1].split("\t")[0] == "the"
    assert main(["lm", "neighbors", str(kinds_run), "Cat", "-k", "3"]) == 0  # lower-cased
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["lm", "neighbors", str(kinds_run), "--analogy", "king", "man", "woman"]) == 0
    out = capsys.readouterr().out.split()
    assert out[:5] == ["king", "-", "man", "+", "woman:"] and "king" not in out[5:]
    assert main(["lm", "neighbors", str(kinds_run), "unicorn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'unicorn' is not in the vocabulary" in err


def test_bad_input_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("one two three\n")
    with pytest.raises(SelfsupError, match="--min-count 5"):
        pretrain_word2vec(data=str(corpus), out=str(tmp_path / "run"))
    with pytest.raises(SelfsupError, match="--window must be at least 1"):
        pretrain_word2vec(data=str(corpus), window=0, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_failed_run_leaves_no_folder_to_block_the_retry(tmp_path: Path) -> None:
    corpus = tmp_path / "words.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log\n" * 40)
    settings = dict(data=str(corpus), dim=8, window=2, min_count=1, epochs=1, sample=0.0,
                    batch_words=64, progress=False, out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(SelfsupError, match="--lr must be positive, got nan"):
        pretrain_word2vec(**{**settings, "lr": float("nan")})
    assert not (tmp_path / "run").exists()
    with pytest.raises(SelfsupError, match="loss became"):  # the weights overflow at once
        pretrain_word2vec(**{**settings, "lr": 1e38, "optimizer": "sgd"})
    assert not (tmp_path / "run").exists()
    assert (pretrain_word2vec(**settings) / "vectors.safetensors").is_file()
