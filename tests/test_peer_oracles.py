"""selfsup against the peers it claims to match, where no other test file already holds that
peer's check: pytorch-metric-learning's NT-Xent and SupCon losses, gensim's subsampling and
nearest-word queries. The peers are in the `dev` extra, so these run in CI, where
tests/conftest.py fails a test skipped for a module it could not import."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from selfsup.image.losses.contrastive import info_nce, nt_xent, supcon_ids
from selfsup.lm.models.word2vec import analogy_query, keep_probabilities, nearest


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_and_supcon_match_pytorch_metric_learning(temperature: float) -> None:
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    # NT-Xent: two views of 6 samples, each sample's only positive its other view
    ours = nt_xent(z[:6], z[6:], temperature)
    theirs = pml.NTXentLoss(temperature=temperature)(z, torch.arange(6).repeat(2))
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(loss, z)[0] for loss in (ours, theirs)))
    # SupCon (L_out): several positives per anchor, and unlabeled samples (-1) that have none
    labels = torch.tensor([0, 1, 2, 0, 1, -1, 3, 0, 2, -1, 3, 1])
    ours = info_nce(z, supcon_ids(labels), temperature)
    own = 100 + torch.arange(12)  # pml: each unlabeled sample a class of its own, no positives
    theirs = pml.SupConLoss(temperature=temperature)(z, torch.where(labels >= 0, labels, own))
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(loss, z)[0] for loss in (ours, theirs)))


def test_subsampling_matches_gensims_sample_int() -> None:
    gensim = pytest.importorskip("gensim.models")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    zipf = [1 / (i + 1) ** 1.5 for i in range(40)]
    sentences = [rng.choices(words, zipf, k=50) for _ in range(40)]
    model = gensim.Word2Vec(vector_size=4, min_count=3, sample=1e-2, workers=1)
    model.build_vocab(sentences)  # counts and keep probabilities only: no training
    vocab = model.wv.index_to_key
    counts = torch.tensor([model.wv.get_vecattr(w, "count") for w in vocab])
    # gensim stores keep · 2³² as uint32, capped at 2³² - 1; words below min_count are dropped,
    # as selfsup's [UNK] (id 0, count 0) is
    theirs = torch.tensor([model.wv.get_vecattr(w, "sample_int") / (2**32 - 1) for w in vocab])
    ours = keep_probabilities(torch.cat([torch.zeros(1, dtype=counts.dtype), counts]), 1e-2)
    assert ours[0] == 0 and 0 < (theirs < 1).sum() < len(vocab)  # both sides of the cap
    torch.testing.assert_close(ours[1:], theirs.float(), rtol=0, atol=1e-6)


def test_nearest_and_analogy_match_gensims_most_similar() -> None:
    keyed = pytest.importorskip("gensim.models").KeyedVectors
    vectors = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    kv = keyed(6)
    kv.add_vectors([str(i) for i in range(30)], vectors.numpy())

    def theirs(**query) -> list[tuple[int, float]]:
        return [(int(key), score) for key, score in kv.most_similar(topn=5, **query)]

    def close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-6)

    close(nearest(vectors, vectors[4], 5, exclude=(4,)), theirs(positive=["4"]))
    for a, b, c in [(1, 2, 3), (7, 0, 11), (29, 5, 17)]:  # a − b + c, the inputs left out
        ours = nearest(vectors, analogy_query(vectors, a, b, c), 5, exclude=(a, b, c))
        close(ours, theirs(positive=[str(a), str(c)], negative=[str(b)]))


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_fails_a_test_skipped_for_a_missing_module(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(
        """
        import pytest

        def test_oracle():
            pytest.importorskip("no_such_peer")

        @pytest.mark.skipif(True, reason="needs a CUDA device")
        def test_gpu():
            pass
        """
    )
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # a faster sub-run
    result = pytester.runpytest_inprocess("-ra")
    out = result.stdout.str()
    if ci:  # the missing peer fails CI, naming the module; the CUDA skip stays a skip
        result.assert_outcomes(failed=1, skipped=1)
        assert "test_oracle - could not import 'no_such_peer'" in out
        assert "CI installs it with pip install -e '.[dev]'" in out
    else:
        result.assert_outcomes(skipped=2)
        assert "could not import 'no_such_peer'" in out and "needs a CUDA device" in out
