"""The sections of a language run (`selfsup lm ...`), read from the files its stage wrote.

Besides metrics.csv / eval.csv and results.json, a stage may leave (and the page shows):
  samples.txt or samples/*.txt  text the model wrote
  fill_mask.json                [{"text": ..., "answer": ..., "candidates": [[token, p], ...]}]
  best_of_n.json                [{"n": 1, "proxy": ..., "gold": ...}, ...]: drawn against n
  answers.json                  [{"prompt": ..., "before": ..., "after": ...}, ...]
  any other RUN/*.json          shown as a table
word2vec runs get their neighbours and an analogy from vectors.safetensors and vocab.tsv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from selfsup.reporting.common import flatten, read_json
from selfsup.reporting.image_run import curves_section
from selfsup.reporting.page import RunPage, Section, esc, fig_img, pre, table

KNOWN = {"results.json", "fill_mask.json", "best_of_n.json", "answers.json"}
NEIGHBOUR_WORDS = ("king", "love", "good", "day", "man", "death", "night", "lord")
ANALOGY = ("king", "man", "woman")
WRITES_SAMPLES = ("gpt",)  # the stages that end by writing samples.txt (`lm pretrain gpt`)


def language_sections(run: Path, config: dict[str, Any], page: RunPage) -> None:
    page.sections.append(curves_section(run, page))
    if (run / "eval.csv").is_file():
        s = curves_section(run, page, ("eval.csv",))
        s.key, s.title = "eval_curves", "Held-out evaluation per iteration (eval.csv)"
        page.sections.append(s)
    results = read_json(run / "results.json")
    if isinstance(results, dict):
        s = Section("results", "Results (results.json)")
        s.body = table(["result", "value"], [(k, _fmt(v)) for k, v in flatten(results)])
        page.sections.append(s)
    kind = config.get("model") or config.get("stage") or ""
    samples = _samples(run, kind, page)
    if samples is not None:
        page.sections.append(samples)
    if (run / "fill_mask.json").is_file() or kind == "bert":
        page.sections.append(_fill_mask(run, page))
    if kind == "word2vec":
        page.sections.append(_word2vec(run, page))
    if kind == "reward":
        page.sections.append(_reward_against_labelers(run, config, page))
    if (run / "best_of_n.json").is_file():
        page.sections.append(_best_of_n(run))
    if (run / "answers.json").is_file():
        page.sections.append(_answers(run))
    for path in sorted(run.glob("*.json")):
        if path.name in KNOWN or path.name.startswith(("tokenizer", "special_tokens")):
            continue
        data = read_json(path)
        s = Section(f"file-{path.stem}", path.name)
        s.body = _any_table(data) if data is not None else ""
        if data is None:
            s.notes.append(f"{path.name} is not readable JSON")
        page.sections.append(s)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _any_table(data: Any) -> str:
    """A list of flat dicts as a table, a dict as key/value rows, anything else as text."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        header = list(dict.fromkeys(k for r in data for k in r))
        return table(header, [[_fmt(r.get(k, "")) for k in header] for r in data[:200]])
    if isinstance(data, dict):
        return table(["key", "value"], [(k, _fmt(v)) for k, v in flatten(data)])
    import json

    return pre(json.dumps(data, indent=1)[:20_000])


def _samples(run: Path, kind: str, page: RunPage) -> Section | None:
    """The text the model wrote; None (no section) for a stage that writes none."""
    s = Section("text_samples", "Samples from the model")
    files = [run / "samples.txt"] if (run / "samples.txt").is_file() else []
    files += sorted((run / "samples").glob("*.txt")) if (run / "samples").is_dir() else []
    if not files and kind not in WRITES_SAMPLES:
        return None
    for path in files:
        text = path.read_text(errors="replace")
        s.body += f"<p>{esc(path.relative_to(run))}</p>" + pre(text[:20_000])
    if not files:
        s.notes.append("the run folder holds no samples.txt")
        page.missing.append(f"samples.txt (write some: selfsup lm generate {run})")
    return s


def _fill_mask(run: Path, page: RunPage) -> Section:
    s = Section("fill_mask", "Fill-mask examples")
    data = read_json(run / "fill_mask.json")
    if not isinstance(data, list):
        s.notes.append("no fill_mask.json in the run folder")
        page.missing.append("fill_mask.json (the fill-mask examples)")
        return s
    for item in data:
        cands = item.get("candidates", []) if isinstance(item, dict) else []
        s.body += f"<p>{esc(item.get('text', '') if isinstance(item, dict) else item)}</p>"
        if isinstance(item, dict) and item.get("answer"):
            s.body += f"<p>the masked word: <b>{esc(item['answer'])}</b></p>"
        s.body += table(["candidate", "probability"], [(c[0], _fmt(c[1])) for c in cands])
    return s


def _word2vec(run: Path, page: RunPage) -> Section:
    s = Section("word2vec", "Nearest words and an analogy")
    try:
        words, vectors = word_vectors(run)
    except (OSError, ValueError, KeyError) as e:
        s.notes.append(f"no word vectors: {e}")
        page.missing.append("vectors.safetensors / vocab.tsv")
        return s
    index = {w: i for i, w in enumerate(words)}
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    queries = [w for w in NEIGHBOUR_WORDS if w in index][:5] or words[50:55]
    rows = []
    for w in queries:
        sims = unit @ unit[index[w]]
        best = [i for i in np.argsort(-sims) if i != index[w]][:6]
        rows.append([w, ", ".join(f"{words[i]} {sims[i]:.2f}" for i in best)])
    s.body = table(["word", "nearest words (cosine)"], rows)
    if all(w in index for w in ANALOGY):
        a, b, c = (unit[index[w]] for w in ANALOGY)
        target = a - b + c
        sims = unit @ (target / max(np.linalg.norm(target), 1e-12))
        best = [i for i in np.argsort(-sims) if words[i] not in ANALOGY][:5]
        s.body += (
            f"<p>{esc(' - '.join(ANALOGY[:2]))} + {esc(ANALOGY[2])} ≈ "
            + esc(", ".join(f"{words[i]} ({sims[i]:.2f})" for i in best))
            + "</p>"
        )
    else:
        s.notes.append(
            f"analogy {' - '.join(ANALOGY[:2])} + {ANALOGY[2]}: a word is not in the vocabulary"
        )
    return s


def word_vectors(run: Path) -> tuple[list[str], np.ndarray]:
    """The words (vocab.tsv order) and input vectors of a word2vec run, read with numpy."""
    from safetensors.numpy import load_file

    words = [line.split("\t")[0] for line in (run / "vocab.tsv").read_text().splitlines()]
    vectors = load_file(run / "vectors.safetensors")["input"].astype(np.float32)
    if len(words) != len(vectors):
        raise ValueError(f"vocab.tsv has {len(words)} words, the vectors {len(vectors)}")
    return words, vectors


def _best_of_n(run: Path) -> Section:
    s = Section("best_of_n", "Best-of-n")
    data = read_json(run / "best_of_n.json")
    rows = data if isinstance(data, list) else []
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("n"), int | float)]
    if not rows:
        s.notes.append("best_of_n.json holds no rows with an n")
        return s
    fig = Figure(figsize=(5.6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for key in [k for k in rows[0] if k != "n" and isinstance(rows[0][k], int | float)]:
        ax.plot([r["n"] for r in rows], [r.get(key, np.nan) for r in rows], marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (samples per prompt)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s.body = fig_img(fig, "best-of-n curve") + _any_table(rows)
    return s


def _reward_against_labelers(run: Path, config: dict[str, Any], page: RunPage) -> Section:
    """The reward model's held-out pair accuracy beside the ceiling it is read against: how
    often two labelers agree (from `lm label`'s RANKINGS.stats.json) and, where the rankings
    carry gold scores, how often the gold score orders a pair as the labelers did."""
    import csv

    s = Section("reward_vs_labelers", "Reward model against the labelers")
    rows: list[tuple[str, str]] = []
    metrics = run / "metrics.csv"
    last: dict[str, str] = {}
    if metrics.is_file():
        with open(metrics, newline="") as f:
            last = ([{}] + list(csv.DictReader(f)))[-1]  # the last epoch's row
    for name, label in (
        ("val_pair_acc", "reward model: held-out pairs ordered as ranked"),
        ("val_gold_ceiling", "gold score: held-out pairs ordered as ranked"),
    ):
        if last.get(name):
            rows.append((label, _pct(last[name])))
    rankings = str(config.get("data") or "")
    stats = read_json(Path(rankings + ".stats.json")) if rankings else None
    if isinstance(stats, dict) and "labeler_agreement" in stats:
        rows.append(
            ("labelers: a second one orders a pair as the first", _pct(stats["labeler_agreement"]))
        )
    else:
        s.notes.append(
            f"no labelers' agreement: {rankings or 'the rankings file'}.stats.json (written by "
            "`selfsup lm label`) is absent"
        )
    s.body = table(["", "agreement"], rows) if rows else ""
    return s


def _pct(value: Any) -> str:
    try:
        return f"{100 * float(value):.1f}%"
    except (TypeError, ValueError):
        return str(value)


def _answers(run: Path) -> Section:
    s = Section("answers", "Answers before and after")
    s.body = _any_table(read_json(run / "answers.json"))
    return s
