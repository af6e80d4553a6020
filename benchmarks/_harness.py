"""Shared benchmark machinery: one fresh subprocess per measurement, alternating configurations.

A benchmark script defines `measure(config: dict) -> dict` (run in the child) and calls
`main(measure, configs, describe)`. The parent runs every configuration once per round, in a
rotated order each round, each in a new Python process (clean peak memory, no warm caches from
the previous configuration), and prints per-configuration medians over rounds.

Peak memory on the CPU is the kernel's resident-set high-water mark (VmHWM), reset just before
the measured call (`reset_peak`) and read right after it (`peak_since_reset`); on CUDA it is
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Config = dict[str, Any]


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(device: str = "cpu") -> int:
    """Start a peak-memory window; returns the memory in use now (the baseline)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    return rss_bytes()


def peak_since_reset(baseline: int, device: str = "cpu") -> int:
    """Peak memory above `baseline` since `reset_peak`, in bytes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    return max(0, _hwm_bytes() - baseline)


def timed(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn (synchronising CUDA around each)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}"
    )


def _child(measure: Callable[[Config], dict], config: Config) -> None:
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    print("RESULT " + json.dumps(measure(config)), flush=True)


def run_rounds(script: Path, configs: list[Config], rounds: int, timeout: float) -> list[list]:
    """results[i] = the child results of configs[i] over the rounds (None where it failed)."""
    results: list[list] = [[] for _ in configs]
    for r in range(rounds):
        order = list(range(len(configs)))
        order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
        for i in order:
            command = [sys.executable, str(script), "--child", json.dumps(configs[i])]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"  round {r + 1}: {label(configs[i])}: timed out", file=sys.stderr)
                results[i].append(None)
                continue
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
                print(f"  round {r + 1}: {label(configs[i])}: failed: {tail[0]}", file=sys.stderr)
                results[i].append(None)
                continue
            results[i].append(json.loads(lines[-1][len("RESULT ") :]))
            print(f"  round {r + 1}: {label(configs[i])}: {results[i][-1]}", file=sys.stderr)
    return results


def label(config: Config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items() if k != "threads")


def median(results: list, key: str) -> float | None:
    values = [r[key] for r in results if r is not None and r.get(key) is not None]
    return statistics.median(values) if values else None


def main(
    measure: Callable[[Config], dict],
    build_configs: Callable[[argparse.Namespace], list[Config]],
    report: Callable[[list[Config], list[list]], None],
    parser: argparse.ArgumentParser,
    timeout: float = 900,
) -> None:
    """Parse args; as a child run one measurement, as the parent run all rounds and report."""
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per config")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(measure, json.loads(args.child))
        return
    torch.set_num_threads(args.threads)
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}; {args.rounds} rounds, medians")
    configs = [{**c, "threads": args.threads} for c in build_configs(args)]
    results = run_rounds(Path(sys.argv[0]).resolve(), configs, args.rounds, timeout)
    report(configs, results)


# --- FLOP utilisation (benchmarks/mfu.py; the GPU script reuses them) ----------------------


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of fn as torch.utils.flop_counter.FlopCounterMode counts them: matrix
    products, convolutions and attention (forward and backward), shapes only; elementwise ops,
    normalisation, pooling, reductions and the optimiser count nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """GFLOP/s of an n×n×n GEMM in `dtype` on the current threads: the median of `repeats` after
    one untimed call (this machine's practical matmul peak in that precision)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b, repeats, device))
    return 2 * n**3 / seconds / 1e9


def has_bf16_matmul(device: str = "cpu") -> bool:
    """Whether bf16 matrix products run natively (AVX-512-BF16 / AMX on a CPU, any recent GPU);
    elsewhere oneDNN emulates them, far slower than float32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table, cells as given (str() of each)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
