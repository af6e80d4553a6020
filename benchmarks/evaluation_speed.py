"""Where `selfsup evaluate` spends its time: wall time of the whole evaluation and of each linear
probe (C by cross-validation plus the final fit), with the C chosen and the final fit's L-BFGS
iterations. Not a test: the numbers depend on the machine and its load (printed).

    python benchmarks/evaluation_speed.py RUN [--fractions 0.01,0.1,1] [--seeds 3]
        [--baselines raw,pca,random] [--limit N] [--device cpu]

Make a run to time (its quality does not matter for speed):
    selfsup pretrain simclr --data npz:../shared/data/cifar10 --backbone convnet --epochs 1 \
        --limit 5000 --out /tmp/evalrun
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from selfsup.api import evaluate
from selfsup.image.evaluation import features as features_module
from selfsup.image.evaluation import few_label as few_label_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--fractions", default="0.01,0.1,1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--baselines", default="raw,pca,random")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    timings: list[tuple[str, float]] = []
    real_probe, real_extract = few_label_module.probe_accuracy, features_module.extract_features

    def timed_probe(x, y, *a, **kw):
        t = time.perf_counter()
        acc = real_probe(x, y, *a, **kw)
        d = kw.get("details", {})
        timings.append(
            (
                f"probe n={len(y):>6} d={x.shape[1]:>5} C={d.get('C', '-'):<7} "
                f"iterations={d.get('n_iter', '-'):<5} acc={100 * acc:.1f}%",
                time.perf_counter() - t,
            )
        )
        print(f"{timings[-1][1]:8.2f} s  {timings[-1][0]}", flush=True)
        return acc

    def timed_extract(model, data, **kw):
        t = time.perf_counter()
        f = real_extract(model, data, **kw)
        timings.append((f"features {type(model).__name__} {f.shape}", time.perf_counter() - t))
        print(f"{timings[-1][1]:8.2f} s  {timings[-1][0]}", flush=True)
        return f

    few_label_module.probe_accuracy = timed_probe
    few_label_module.extract_features = timed_extract
    import selfsup.api as api

    api.extract_features = timed_extract
    load = os.getloadavg()
    t0 = time.perf_counter()
    results = evaluate(
        args.run,
        fractions=args.fractions,
        seeds=args.seeds,
        baselines=args.baselines,
        limit=args.limit,
        device=args.device,
    )
    total = time.perf_counter() - t0
    print(results["table"])
    print(
        f"total {total:.1f} s for evaluate({args.run!r}, fractions={args.fractions}, "
        f"seeds={args.seeds}, baselines={args.baselines}) on {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
