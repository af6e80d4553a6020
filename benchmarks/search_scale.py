"""Similarity search at scale: `selfsup index --approximate` (FAISS) against exact search.

    python benchmarks/search_scale.py                      # 1M 256-d vectors, both data sets
    python benchmarks/search_scale.py --n 100000 --data clustered

Synthetic unit-norm 256-d embeddings (the small ConvNet's dimension), N in the index and 1,000
held-out queries from the same distribution:
- `clustered`: random unit centres (--clusters), each point its centre plus Gaussian noise of the
  same norm (--noise 1: cosine ~0.7 to its centre, ~0.5 to its cluster's other points), then
  normalised: embeddings with structure, as an encoder's are;
- `random`: i.i.d. Gaussian directions (no structure: the hardest case for any index).

For each: the FAISS build time (k-means + adding + choosing nprobe; exact search has no build
step), recall@10 of the FAISS answers against exact search, and the query time of FAISS, of
selfsup's exact search (torch matrix products over chunks, what `selfsup similar` uses without
FAISS) and of a numpy brute force (matrix product + argpartition), for 1,000 queries at once and
one query at a time (`selfsup similar` asks one). Everything on one thread (torch, numpy's BLAS,
FAISS's OpenMP), so the ratios compare algorithms, not thread counts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/faiss load their thread pools

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from selfsup.image.use import ann  # noqa: E402
from selfsup.image.use.exact import exact_search  # noqa: E402


def synthetic(kind: str, n: int, d: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    """n unit vectors, made in blocks (no float64 copy of the whole set)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "clustered":
            x = centres[rng.integers(0, clusters, m)] + np.float32(noise / np.sqrt(d)) * x
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Top-k ids by inner product, 100 queries at a time (a 1000×N score matrix is 4 GB)."""
    out = []
    for s in range(0, len(q), 100):
        scores = q[s : s + 100] @ x.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each truth row's ids that `found` has too (recall@k)."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))  # noqa: B905


def per_query(search, base, queries: np.ndarray, k: int) -> float:
    """Mean seconds of `search(base, one_query, k)`, one query at a time."""
    start = time.perf_counter()
    for v in queries:
        search(base, v[None], k)
    return (time.perf_counter() - start) / len(queries)


def measure(kind: str, args: argparse.Namespace, k: int = 10) -> None:
    data = synthetic(kind, args.n + args.queries, args.dim, args.clusters, args.noise, 0)
    x, q = data[: args.n], data[args.n :]
    what = f"{args.clusters} clusters, noise {args.noise}" if kind == "clustered" else "iid"
    print(f"\n{kind} ({what}): {args.n:,} × {args.dim} in the index, {len(q)} queries")
    (index, info), build_s = timed(ann.build, x)
    print(
        f"FAISS IVF-SQ8 + re-ranking build: {build_s:.1f} s ({info['lists']} lists, nprobe "
        f"{info['nprobe']}, recall@10 {info['sample_recall']:.3f} on its own sample)"
    )
    (exact_ids, _), exact_s = timed(exact_search, x, q, k)
    numpy_ids, numpy_s = timed(numpy_brute_force, x, q, k)
    (approx_ids, _), approx_s = timed(ann.search, index, q, k)
    one = q[: args.single]
    exact_1 = per_query(exact_search, x, one, k)
    numpy_1 = per_query(numpy_brute_force, x, one, k)
    approx_1 = per_query(ann.search, index, one, k)
    recall, agree = overlap(approx_ids, exact_ids), overlap(numpy_ids, exact_ids)
    print(f"recall@10 of FAISS against exact search: {recall:.4f} (numpy vs exact {agree:.4f})")
    print(f"{'':28}{'FAISS':>10}{'exact':>10}{'numpy':>10}  exact/FAISS  numpy/FAISS")
    print(
        f"{f'{len(q)} queries at once (s)':28}{approx_s:10.2f}{exact_s:10.2f}{numpy_s:10.2f}"
        f"  {exact_s / approx_s:11.1f}  {numpy_s / approx_s:11.1f}"
    )
    print(
        f"{'one query (ms)':28}{1e3 * approx_1:10.2f}{1e3 * exact_1:10.1f}{1e3 * numpy_1:10.1f}"
        f"  {exact_1 / approx_1:11.1f}  {numpy_1 / approx_1:11.1f}"
    )
    paid = build_s / (exact_1 - approx_1) if exact_1 > approx_1 else float("inf")
    print(f"the build pays for itself after {paid:,.0f} single queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="one-at-a-time queries timed")
    parser.add_argument("--data", default="clustered,random")
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--noise", type=float, default=1.0)
    args = parser.parse_args()
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, one thread; faiss {faiss.__version__}, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )
    for kind in args.data.split(","):
        measure(kind, args)


if __name__ == "__main__":
    main()
