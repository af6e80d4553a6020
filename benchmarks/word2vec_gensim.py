"""selfsup's word2vec next to gensim's Word2Vec: same corpus, same words, same settings.

    python benchmarks/word2vec_gensim.py [--corpus ../shared/data/text/tinyshakespeare.txt]

Both train skip-gram with negative sampling (dim 100, window 5, 5 negatives, sample 1e-3,
lr 0.025 decayed linearly, 5 epochs) on the same word sequence: selfsup's vocabulary
(lower-cased words seen at least 5 times, in 2,000-word pieces, gensim's "sentences"). Prints
words/second of both (training only) and the overlap of the 10 nearest neighbours of the 100
most frequent words -- next to the overlap of two gensim runs that differ only in their seed,
the agreement one can expect at all. Needs `pip install gensim` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from selfsup.lm.models.word2vec import WordVectors, pretrain_word2vec

SETTINGS = dict(dim=100, window=5, negatives=5, min_count=5, sample=1e-3, lr=0.025, epochs=5)
CHUNK = 2000


def gensim_model(sentences: list[list[str]], seed: int, workers: int):
    from gensim.models import Word2Vec

    model = Word2Vec(
        vector_size=SETTINGS["dim"],
        window=SETTINGS["window"],
        negative=SETTINGS["negatives"],
        min_count=1,  # the words are selfsup's vocabulary already
        sample=SETTINGS["sample"],
        alpha=SETTINGS["lr"],
        min_alpha=SETTINGS["lr"] * 1e-4,
        sg=1,
        hs=0,
        seed=seed,
        workers=workers,
    )
    model.build_vocab(sentences)
    start = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=SETTINGS["epochs"])
    return model, time.perf_counter() - start


def overlap(a: dict[str, list[str]], b: dict[str, list[str]]) -> float:
    return float(np.mean([len(set(a[w]) & set(b[w])) / len(a[w]) for w in a]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="../shared/data/text/tinyshakespeare.txt")
    parser.add_argument("--workers", type=int, default=2, help="gensim threads (2 cores here)")
    args = parser.parse_args()

    run = pretrain_word2vec(
        data=args.corpus,
        batch_words=CHUNK,
        progress=False,
        out=str(Path(tempfile.mkdtemp()) / "run"),
        **SETTINGS,
    )
    ours = json.loads((run / "results.json").read_text())
    vectors = WordVectors(run)
    ids = np.load(run / "ids.npy")
    words = [vectors.words[i] for i in ids if i != 0]  # the same words selfsup trained on
    sentences = [words[i : i + CHUNK] for i in range(0, len(words), CHUNK)]
    queries = vectors.words[1:101]  # the 100 most frequent words

    neighbours = {"selfsup": {w: [x for x, _ in vectors.neighbors(w, 10)] for w in queries}}
    speed = {"selfsup": ours["words_per_s"]}
    for name, seed in [("gensim", 1), ("gensim (seed 2)", 2)]:
        model, seconds = gensim_model(sentences, seed, args.workers)
        speed[name] = round(SETTINGS["epochs"] * len(ids) / seconds)
        neighbours[name] = {w: [x for x, _ in model.wv.most_similar(w, topn=10)] for w in queries}

    print(f"corpus {args.corpus}: {len(words):,} words, vocabulary {len(vectors.words) - 1:,}")
    for name, rate in speed.items():
        print(f"{name:<16} {rate:>10,} words/s")
    print(f"speed ratio selfsup / gensim: {speed['selfsup'] / speed['gensim']:.2f}")
    print(
        "10-nearest-neighbour overlap (100 most frequent words): selfsup vs gensim "
        f"{overlap(neighbours['selfsup'], neighbours['gensim']):.2f}, gensim vs gensim (seed 2) "
        f"{overlap(neighbours['gensim'], neighbours['gensim (seed 2)']):.2f}"
    )
    for word in ("king", "father", "night"):
        if word in neighbours["selfsup"]:
            print(f"{word}: selfsup {neighbours['selfsup'][word][:5]}")
            print(f"{' ' * len(word)}  gensim  {neighbours['gensim'][word][:5]}")


if __name__ == "__main__":
    main()
