"""Wall time of `selfsup ... --help` (issue 19: help and usage errors under a second).

    python benchmarks/help_time.py            # 5 runs of each, the median
    python benchmarks/help_time.py --runs 9

Each run is a fresh `python -m selfsup.cli.main` process, so the time includes Python's start and
every import the command makes (the point: no torch for help).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    ["--help"],
    ["pretrain", "simclr", "--help"],
    ["lm", "pretrain", "gpt", "--help"],
]


def wall(argv: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "selfsup.cli.main", *argv], check=True, capture_output=True
    )
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default: 5)")
    args = parser.parse_args()
    wall(["--version"])  # warm the file cache once
    for argv in COMMANDS:
        times = [wall(argv) for _ in range(args.runs)]
        print(
            f"selfsup {' '.join(argv):<28} median {statistics.median(times):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} runs)"
        )


if __name__ == "__main__":
    main()
