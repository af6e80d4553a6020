"""Peak memory and throughput of the folder commands on 10,000 and 100,000 image files.

    python benchmarks/folder_scale.py RUN --sizes 10000,100000 --work /tmp/folder_scale

Writes N CIFAR-10 images as 32×32 PNG files (the 50,000 training images, then the 10,000 test
images, then the training images mirrored left-right: 110,000 distinct files at most) into
WORK/N/, then runs, each as its own `selfsup` process under `/usr/bin/time -v`: `index`,
`predict` (a classifier from 100 labeled files), `embed --data folder:` and `select --data
folder: --budget 100`. Prints each command's wall time, images per second and peak resident
memory (the main process; the image loaders' worker processes are not counted), against a
process that only imports selfsup and torch. Deletes WORK at the end.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def cifar() -> tuple[np.ndarray, np.ndarray]:
    parts = [np.load(DATA / f, allow_pickle=False) for f in ("train-1.npz", "train-2.npz")]
    test = np.load(DATA / "test.npz", allow_pickle=False)
    train_x = np.concatenate([p["x"] for p in parts])
    train_y = np.concatenate([p["y"] for p in parts])
    return (
        np.concatenate([train_x, test["x"], train_x[:, :, ::-1]]),
        np.concatenate([train_y, test["y"], train_y]),
    )


def write_folder(folder: Path, x: np.ndarray, n: int) -> float:
    """n PNG files in one folder (sub-folders would be read as classes); returns the seconds."""
    start = time.perf_counter()
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(x[i]).save(folder / f"{i:06d}.png", compress_level=1)
    return time.perf_counter() - start


def measured(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one command under /usr/bin/time -v."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr)[1]
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    return seconds, rss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run on 32×32 RGB images (e.g. CIFAR-10)")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--work", default="/tmp/folder_scale")
    args = parser.parse_args()
    work = Path(args.work)
    x, y = cifar()
    selfsup = [sys.executable, "-m", "selfsup"]
    _, base = measured([sys.executable, "-c", "import torch, selfsup.api"])
    print(f"python importing selfsup and torch: {base:.0f} MiB")
    print(f"{'files':>7} {'command':8} {'wall s':>7} {'images/s':>9} {'peak MiB':>9}")
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            folder = work / str(n)
            written = write_folder(folder, x, n)
            print(f"{n:7d} {'write':8} {written:7.1f} {n / written:9.0f} {'':>9}", flush=True)
            labels = work / f"labels-{n}.csv"
            labels.write_text(
                "path,label\n" + "".join(f"{n}/{i:06d}.png,{y[i]}\n" for i in range(100))
            )
            classifier = work / f"{n}.classifier"
            subprocess.run(
                [*selfsup, "classify", args.run, "--labels", str(labels), "--out", str(classifier)],
                check=True,
                capture_output=True,
            )
            spec = f"folder:{folder}"
            commands = {
                "index": ["index", args.run, spec, "-o", str(work / f"{n}.index")],
                "predict": ["predict", str(classifier), spec, "-o", str(work / f"{n}.csv")],
                "embed": ["embed", args.run, "--data", spec, "-o", str(work / f"{n}.npy")],
                "select": ["select", args.run, "--data", spec, "--budget", "100"],
            }
            commands["select"] += ["-o", str(work / f"select-{n}.csv")]
            for name, argv in commands.items():
                wall, rss = measured([*selfsup, *argv])
                print(f"{n:7d} {name:8} {wall:7.1f} {n / wall:9.0f} {rss:9.0f}", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
