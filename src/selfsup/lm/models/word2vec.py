"""word2vec: skip-gram with negative sampling (Mikolov et al., 2013).

"The meaning of a word can be defined by its context": every word predicts the words around it.
The pretext task is binary -- is this (centre, context) pair real, or is the context drawn from a
noise distribution? -- so no softmax over the vocabulary is needed:

    loss = -log σ(u_w · v_c) - Σ_k log σ(-u_w · v_nk),   n_k ~ unigram(w)^0.75

Also as in the original C tool (and gensim): frequent words are randomly dropped before the
windows are formed ("subsampling"), and each centre word draws its window size uniformly from
1..window ("dynamic window"), so near words count more than far ones.

A training batch is a chunk of consecutive word ids; the step's generator subsamples it, forms
the pairs and draws the negatives, so all randomness of a step comes from one seeded generator.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

from selfsup.core import run as rundir
from selfsup.core.config import check_fields, option
from selfsup.core.errors import NonFiniteLossError, SelfsupError
from selfsup.engine.trainer import build_trainer, seed_everything
from selfsup.lm.models.hf import check_accelerator
from selfsup.lm.options import check_one_device

UNK = "[UNK]"
VECTORS = "vectors.safetensors"


@dataclass
class Options:
    """`selfsup lm pretrain word2vec`: gensim's names and defaults where it has the option."""

    data: str | None = option(None, "the corpus: a .txt or .jsonl file, or a folder of them")
    encoding: str = option("utf-8", "text encoding of the corpus files")
    text_field: str = option("text", "field of the text in .jsonl records")
    dim: int = option(100, "size of the word vectors (gensim: vector_size)", check=">=1")
    window: int = option(5, "largest distance between a word and its context", check=">=1")
    negatives: int = option(
        5, "noise words per (word, context) pair (gensim: negative)", check=">=1"
    )
    min_count: int = option(5, "ignore words seen fewer times", check=">=1")
    sample: float = option(
        1e-3, "subsampling threshold for frequent words (0: keep all)", check=">=0"
    )
    epochs: int = option(5, "passes over the corpus (word2vec counts epochs)", check=">=1")
    optimizer: str = option(
        "sgd", "sgd (word2vec's, per-pair rate) | adam (steadier on small vocabularies)"
    )
    lr: float = option(
        0.025, "learning rate, decayed linearly to 0 (gensim: alpha; adam: try 0.03)", check=">0"
    )
    batch_words: int = option(2000, "consecutive words per step (windows stay inside)", check=">=1")
    seed: int = option(
        0, "random seed (initialisation, subsampling, windows, negatives)", check="seed"
    )
    accelerator: str = option("cpu", "cpu | gpu | auto (Lightning)")
    devices: str = option("1", "1 or auto: this stage trains in one process, on one device")
    precision: str = option(
        "32-true", "Lightning precision, e.g. bf16-mixed on a GPU", check="precision"
    )
    progress: bool | None = option(None, "progress bar (default: on a terminal)")
    out: str | None = option(None, "run directory (default runs/lm-word2vec-CORPUS-TIMESTAMP)")


Word2VecConfig = Options  # the name the functions below use


def noise_distribution(counts: Tensor, power: float = 0.75) -> Tensor:
    """P(w) ∝ count(w)^power: the negatives' distribution (rare words drawn more than unigram)."""
    weights = counts.double().pow(power)
    return (weights / weights.sum()).float()


def keep_probabilities(counts: Tensor, sample: float = 1e-3) -> Tensor:
    """Probability of keeping each occurrence of a word, the word2vec C / gensim formula.

    With f = count / total: keep = (sqrt(f / sample) + 1) · sample / f, capped at 1 -- words
    rarer than about `sample` are always kept, very frequent ones mostly dropped. `sample=0`
    keeps everything. Words with count 0 (the unknown word) are never kept.
    """
    frequency = counts.double() / counts.sum()
    keep = ((frequency / sample).sqrt() + 1) * sample / frequency if sample > 0 else 1.0
    return torch.where(counts > 0, keep, 0.0).clamp(max=1.0).float()


def skipgram_pairs(ids: Tensor, window: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(centres, contexts) of one sequence with a dynamic window.

    Each position draws b ~ U{1..window} and pairs with every word within distance b.
    """
    n = len(ids)
    reach = torch.randint(1, window + 1, (n,), generator=g, device=ids.device)
    position = torch.arange(n, device=ids.device)
    centres, contexts = [], []
    for d in range(1, min(window, n - 1) + 1):
        for start, stop in ((0, n - d), (d, n)):  # context to the right, then to the left
            pos = position[start:stop][reach[start:stop] >= d]
            centres.append(ids[pos])
            contexts.append(ids[pos + d if start == 0 else pos - d])
    if not centres:
        empty = ids.new_empty(0)
        return empty, empty
    return torch.cat(centres), torch.cat(contexts)


def sample_noise(cdf: Tensor, shape: Sequence[int], g: torch.Generator) -> Tensor:
    """Word ids drawn from the distribution with cumulative sum `cdf` (inverse-CDF sampling)."""
    u = torch.rand(*shape, generator=g, device=cdf.device)
    return torch.searchsorted(cdf, u).clamp_(max=len(cdf) - 1)


def sgns_loss(centre: Tensor, context: Tensor, negatives: Tensor) -> Tensor:
    """Mean skip-gram negative-sampling loss: centre B×D, context B×D, negatives B×K×D."""
    positive = (centre * context).sum(-1)
    negative = (negatives * centre.unsqueeze(1)).sum(-1)  # faster than bmm on CPU for K×D
    return -(F.logsigmoid(positive) + F.logsigmoid(-negative).sum(-1)).mean()


class SkipGram(nn.Module):
    """Two embedding tables: `input` (the word vectors one keeps) and `output` (contexts).

    Initialised as in word2vec: input uniform in ±0.5/dim, output zero. Dense gradients: on CPU
    they were faster than sparse ones here (sparse backward and coalescing cost more than
    zeroing a V×D table at word2vec's vocabulary sizes).
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.input = nn.Embedding(vocab_size, dim)
        self.output = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.input.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.output.weight)

    def loss(self, centres: Tensor, contexts: Tensor, negatives: Tensor) -> Tensor:
        return sgns_loss(self.input(centres), self.output(contexts), self.output(negatives))


def chunk_pairs(
    chunk: Tensor, keep: Tensor, window: int, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Subsample one chunk of word ids (each kept with probability keep[id]), then pair."""
    kept = chunk[torch.rand(len(chunk), generator=g, device=chunk.device) < keep[chunk]]
    return skipgram_pairs(kept, window, g)


def nearest(
    vectors: Tensor, query: Tensor, k: int, exclude: Sequence[int] = ()
) -> list[tuple[int, float]]:
    """The k rows of `vectors` with the highest cosine similarity to `query` (ids, similarity)."""
    unit = F.normalize(vectors.float(), dim=1)
    similarity = unit @ F.normalize(query.float(), dim=0)
    if exclude:
        similarity[list(exclude)] = -math.inf
    top = similarity.topk(min(k, len(vectors) - len(exclude)))
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def analogy_query(vectors: Tensor, a: int, b: int, c: int) -> Tensor:
    """a − b + c on unit vectors (3CosAdd, as gensim's most_similar(positive=[a, c], [b]))."""
    unit = F.normalize(vectors.float(), dim=1)
    return unit[a] - unit[b] + unit[c]


# --- training: a word-level vocabulary, a Lightning module, the run directory ----------------


def word_tokenizer(texts: Sequence[str], min_count: int) -> PreTrainedTokenizerFast:
    """Lower-cased words (letters, digits, apostrophes), those seen at least `min_count` times.

    Ids are in order of decreasing frequency; id 0 is [UNK], which training drops (as gensim
    drops words below min_count). Saved as the run's tokenizer.json.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\w']+"), behavior="removed")
    trainer = trainers.WordLevelTrainer(
        vocab_size=1 << 30, min_frequency=min_count, special_tokens=[UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK)


class Word2Vec(L.LightningModule):
    """Skip-gram with negative sampling, trained like word2vec: SGD with a per-pair rate (the
    summed loss), linearly decayed. A batch sums many updates of a frequent word at once, which
    can diverge on a tiny vocabulary; Adam (scale-free) is the steadier choice there."""

    Options = Options
    help = "word2vec: skip-gram with negative sampling (Mikolov et al., 2013)."
    entry = "run_pretrain"  # its own loop; its Options are its whole configuration

    def __init__(self, counts: Tensor, config: Word2VecConfig, total_steps: int) -> None:
        super().__init__()
        self.config, self.total_steps = config, total_steps
        self.model = SkipGram(len(counts), config.dim)
        self.register_buffer("cdf", noise_distribution(counts).cumsum(0))
        self.register_buffer("keep", keep_probabilities(counts, config.sample))

    def training_step(self, chunk: Tensor, batch_idx: int) -> Tensor | None:
        seed = self.config.seed * 1_000_003 + self.global_step
        g = torch.Generator(device=self.device).manual_seed(seed)
        centres, contexts = chunk_pairs(chunk, self.keep, self.config.window, g)
        if len(centres) == 0:
            return None  # every word of the chunk was subsampled away: skip the step
        negatives = sample_noise(self.cdf, (len(centres), self.config.negatives), g)
        loss = self.model.loss(centres, contexts, negatives)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the word2vec loss became {loss.item()} at step {self.global_step}; "
                "lower --lr or --batch-words, or use --optimizer adam"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/pairs", float(len(centres)))
        # word2vec's learning rate applies to every pair: the summed loss, not the mean.
        return loss * len(centres)

    def configure_optimizers(self) -> dict[str, Any]:
        kind = torch.optim.Adam if self.config.optimizer == "adam" else torch.optim.SGD
        optimizer = kind(self.parameters(), lr=self.config.lr)
        decay = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(1e-4, 1 - step / self.total_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class _Chunks(torch.utils.data.Dataset):
    """Consecutive `size`-word pieces of a (memory-mapped) id array."""

    def __init__(self, ids: np.ndarray, size: int) -> None:
        self.ids, self.size = ids, size

    def __len__(self) -> int:
        return -(-len(self.ids) // self.size)

    def __getitem__(self, i: int) -> Tensor:
        return torch.from_numpy(self.ids[i * self.size : (i + 1) * self.size].astype(np.int64))


@rundir.releases_run_locks
def pretrain_word2vec(
    config: Word2VecConfig | None = None, *, command: str | None = None, **settings: Any
) -> Path:
    """Train word vectors on a corpus; returns the run directory.

    `pretrain_word2vec(data="shakespeare.txt", epochs=5)` is the same as
    `selfsup lm pretrain word2vec --data shakespeare.txt --epochs 5`.

    RUN/ holds config.yaml, command.txt, tokenizer.json (the vocabulary), ids.npy (the corpus
    as word ids), vocab.tsv (word and count, by frequency), vectors.safetensors (`input`: the
    word vectors, `output`: the context vectors), results.json (training speed), checkpoints/
    and metrics.csv.
    """
    from selfsup.lm.data.corpus import read_texts

    if "corpus" in settings:  # the name before `data` (issue 19)
        settings["data"] = settings.pop("corpus")
    config = replace(config or Word2VecConfig(), **settings)
    if not config.data:
        raise SelfsupError("--data is required: a .txt or .jsonl file, or a folder of them")
    check_fields(config)  # the ranges its fields declare
    if config.optimizer not in ("sgd", "adam"):
        raise SelfsupError(f"--optimizer {config.optimizer!r} is unknown; expected sgd or adam")
    check_accelerator(config.accelerator)
    check_one_device(config.devices)
    texts = read_texts(config.data, config.encoding, config.text_field)
    tokenizer = word_tokenizer(texts, config.min_count)
    if len(tokenizer) < 2:
        raise SelfsupError(
            f"corpus {config.data} has no word seen at least --min-count {config.min_count} "
            "times; lower --min-count"
        )
    run = Path(config.out or rundir.default_run_dir("lm-word2vec", config.data))
    # no resume: until results.json is written, a run is remains that the next one reuses
    folder = rundir.RunFolder.claim(run, resume=False, **WORD2VEC_RUN)
    saved = {"model": "word2vec", **asdict(config), "vocabulary": len(tokenizer)}
    with folder.training():  # a run that fails (e.g. a NaN loss) leaves no folder behind
        folder.begin(saved, command or f"pretrain_word2vec({config!r})")
        return _train(run, config, tokenizer, texts)


RESULTS = "results.json"
WORD2VEC_RUN: dict[str, Any] = dict(
    early={"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "ids.npy",
           "vocab.tsv", VECTORS},
    kept=lambda run: (run / RESULTS).is_file(),
    resumable=False,
)  # fmt: skip


def _train(run: Path, config: Word2VecConfig, tokenizer: Any, texts: list[str]) -> Path:
    from selfsup.lm.data.corpus import encode_corpus

    tokenizer.save_pretrained(str(run))
    ids = encode_corpus(tokenizer, texts, run / "ids.npy")
    counts = torch.from_numpy(np.bincount(ids, minlength=len(tokenizer))).double()
    counts[tokenizer.unk_token_id] = 0  # never a negative, always subsampled away
    _write_vocab(run / "vocab.tsv", tokenizer, counts)

    seed_everything(config.seed)
    chunks = _Chunks(ids, config.batch_words)
    method = Word2Vec(counts, config, total_steps=config.epochs * len(chunks))
    loader = torch.utils.data.DataLoader(
        chunks,
        batch_size=None,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    trainer = build_trainer(  # one process; no resume, so no Ctrl-C hint
        run,
        config,
        hint=None,
        bar=dict(refresh_rate=10),
        max_epochs=config.epochs,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(method, loader)
    seconds = time.perf_counter() - start
    save_vectors(run, method.model)
    words = config.epochs * len(ids)
    speed = {"words": words, "seconds": round(seconds, 2), "words_per_s": round(words / seconds)}
    rundir.atomic_write_text(run / RESULTS, json.dumps(speed, indent=2) + "\n")
    print(f"word2vec: {words:,} words in {seconds:.1f} s ({words / seconds:,.0f} words/s)")
    return run


def _write_vocab(path: Path, tokenizer: PreTrainedTokenizerFast, counts: Tensor) -> None:
    words = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    lines = [f"{w}\t{int(c)}" for w, c in zip(words, counts.tolist(), strict=True)]
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")


def save_vectors(run: Path, model: SkipGram) -> None:
    tensors = {
        "input": model.input.weight.detach().cpu().contiguous(),
        "output": model.output.weight.detach().cpu().contiguous(),
    }
    rundir.atomic_write_bytes(run / VECTORS, save(tensors))


class WordVectors:
    """A trained run's word vectors: `neighbors("king")`, `analogy("king", "man", "woman")`."""

    def __init__(self, run: str | Path) -> None:
        from selfsup.core.tokenizer import load_tokenizer

        path = Path(run) / VECTORS
        if not path.is_file():
            raise SelfsupError(f"{path} is missing: {run} is not a finished word2vec run")
        self.run, self.tokenizer = Path(run), load_tokenizer(run)
        self.vectors = load_file(path)["input"]
        self.words = self.tokenizer.convert_ids_to_tokens(list(range(len(self.vectors))))

    def id(self, word: str) -> int:
        normalized = self.tokenizer.backend_tokenizer.normalizer.normalize_str(word)
        index = self.tokenizer.convert_tokens_to_ids(normalized)
        if index is None or index == self.tokenizer.unk_token_id:
            raise SelfsupError(
                f"word {word!r} is not in the vocabulary of {self.run} ({len(self.words) - 1} "
                "words, those seen at least --min-count times)"
            )
        return index

    def neighbors(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        i = self.id(word)
        found = nearest(self.vectors, self.vectors[i], k, exclude=[i, 0])
        return [(self.words[j], s) for j, s in found]

    def analogy(self, a: str, b: str, c: str, k: int = 10) -> list[tuple[str, float]]:
        """Words closest to a − b + c (king − man + woman ≈ queen), a, b and c left out."""
        ia, ib, ic = self.id(a), self.id(b), self.id(c)
        query = analogy_query(self.vectors, ia, ib, ic)
        found = nearest(self.vectors, query, k, exclude=sorted({ia, ib, ic, 0}))
        return [(self.words[j], s) for j, s in found]


def run_pretrain(config: Word2VecConfig, *, command: str) -> Path:
    """The `selfsup lm pretrain word2vec` entry (see selfsup.cli.lm.main)."""
    return pretrain_word2vec(config, command=command)
