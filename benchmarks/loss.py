"""NT-Xent forward+backward: selfsup vs lightly vs pytorch-metric-learning vs the matmul floor.

    python benchmarks/loss.py                      # N = 256, 1024, 4096, 16384; 3 rounds
    python benchmarks/loss.py --sizes 256,1024 --rounds 5

Two views of N×128 float32 embeddings, temperature 0.5, one process per (implementation, N),
alternating. Per run: one forward+backward whose peak memory above the inputs is recorded, then
`--repeats` timed ones (median). `floor` is the three products the loss and its gradient need
(Q·Kᵀ, E·K, Eᵀ·Q over 2N×128 embeddings), computed block-wise into one reused buffer: the
matrix-multiply time alone, without exp, sums or memory traffic for a 2N×2N matrix. Peers run
only up to the sizes where they fit in memory (`--peer-max-n`, `--pml-max-n`). Before timing,
the loss values and gradients of selfsup and the peers are compared in float64 and float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

D, TEMPERATURE = 128, 0.5


def loss_fn(impl: str):
    """(z0, z1) -> scalar loss, or for `floor` the three matrix products."""
    if impl == "selfsup":
        from selfsup.image.losses import nt_xent

        return lambda z0, z1: nt_xent(z0, z1, TEMPERATURE)
    if impl == "lightly":
        from lightly.loss import NTXentLoss

        return NTXentLoss(temperature=TEMPERATURE)
    if impl == "pml":
        from pytorch_metric_learning.losses import NTXentLoss

        pml = NTXentLoss(temperature=TEMPERATURE)
        return lambda z0, z1: pml(torch.cat([z0, z1]), torch.arange(len(z0)).repeat(2))
    if impl == "floor":
        from selfsup.image.losses.chunked import BLOCK_ELEMENTS

        def floor(z0: torch.Tensor, z1: torch.Tensor) -> None:
            z = torch.cat([z0, z1]).detach()
            n = len(z)
            rows = max(1, min(n, BLOCK_ELEMENTS // n))
            buf, gq, gk = z.new_empty(rows, n), torch.empty_like(z), torch.zeros_like(z)
            for lo in range(0, n, rows):
                e = torch.mm(z[lo : lo + rows], z.t(), out=buf[: min(rows, n - lo)])
                torch.mm(e, z, out=gq[lo : lo + rows])
                gk.addmm_(e.t(), z[lo : lo + rows])

        return floor
    raise ValueError(impl)


def measure(config: H.Config) -> dict:
    n, fn = config["n"], loss_fn(config["impl"])
    g = torch.Generator().manual_seed(n)
    z0 = torch.randn(n, D, generator=g).requires_grad_()
    z1 = torch.randn(n, D, generator=g).requires_grad_()

    def step() -> None:
        z0.grad = z1.grad = None
        loss = fn(z0, z1)
        if loss is not None:
            loss.backward()

    base = H.reset_peak()
    step()  # the first call: its peak is the memory the loss needs
    peak = H.peak_since_reset(base)
    times = H.timed(step, config["repeats"])
    return {"seconds": sorted(times)[len(times) // 2], "peak_mib": peak / 2**20}


def check_equal(sizes: list[int]) -> None:
    """Loss values and gradients of selfsup vs lightly (and pml at 256) in float64 and float32."""
    print("\nequality with the peers (max |difference|):")
    for dtype in (torch.float64, torch.float32):
        for n in sizes:
            g = torch.Generator().manual_seed(1)
            z = [torch.randn(n, D, generator=g, dtype=dtype) for _ in range(2)]
            results = {}
            for impl in ("selfsup", "lightly", "pml") if n <= 256 else ("selfsup", "lightly"):
                leaves = [t.clone().requires_grad_() for t in z]
                loss = loss_fn(impl)(*leaves)
                results[impl] = (loss.detach(), torch.autograd.grad(loss, leaves))
            ours_loss, ours_grads = results.pop("selfsup")
            for impl, (loss, grads) in results.items():
                dg = max((a - b).abs().max().item() for a, b in zip(ours_grads, grads, strict=True))
                print(
                    f"  {str(dtype)[6:]:8s} N={n:<5d} vs {impl:8s} loss {ours_loss.item():.6f} "
                    f"diff {abs(ours_loss - loss).item():.1e}, gradient diff {dg:.1e} "
                    f"(gradient scale {ours_grads[0].abs().max().item():.1e})"
                )


def build_configs(args: argparse.Namespace) -> list[H.Config]:
    configs = []
    for n in args.sizes:
        for impl in ("selfsup", "floor", "lightly", "pml"):
            if impl == "lightly" and n > args.peer_max_n or impl == "pml" and n > args.pml_max_n:
                continue
            configs.append({"impl": impl, "n": n, "repeats": args.repeats})
    if not args.no_check:
        check_equal([n for n in (256, 1024) if n <= max(args.sizes)])
    return configs


def report(configs: list[H.Config], results: list[list]) -> None:
    by = {(c["impl"], c["n"]): r for c, r in zip(configs, results, strict=True)}
    print("\nforward+backward, two views of N×128 (float32, τ = 0.5): median time, peak memory")
    head = f"{'N':>6} {'impl':8} {'time':>10} {'+peak MiB':>10} {'vs lightly':>11} {'vs floor':>9}"
    print(head + "\n" + "-" * len(head))
    for c in configs:
        r = by[(c["impl"], c["n"])]
        t, m = H.median(r, "seconds"), H.median(r, "peak_mib")
        if t is None:
            print(f"{c['n']:>6} {c['impl']:8} {'failed':>10}")
            continue
        ref_l, ref_f = (H.median(by.get((i, c["n"]), []), "seconds") for i in ("lightly", "floor"))
        speed = f"{ref_l / t:.2f}x" if ref_l and c["impl"] != "lightly" else ""
        floor = f"{t / ref_f:.2f}" if ref_f and c["impl"] != "floor" else ""
        print(f"{c['n']:>6} {c['impl']:8} {t * 1e3:>8.1f}ms {m:>10.0f} {speed:>11} {floor:>9}")
    print("vs lightly: lightly's time / this time (higher is faster); vs floor: time / floor")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[256, 1024, 4096, 16384]
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    parser.add_argument("--peer-max-n", type=int, default=4096, help="largest N for lightly")
    parser.add_argument("--pml-max-n", type=int, default=256, help="largest N for pml")
    parser.add_argument("--no-check", action="store_true", help="skip the equality check")
    H.main(measure, build_configs, report, parser)
