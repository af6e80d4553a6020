"""Two-view SimCLR augmentation throughput at 32 px: selfsup vs lightly vs kornia.

    python benchmarks/augment.py                   # batch 256, 3 rounds
    python benchmarks/augment.py --batches 20 --rounds 5

Source images per second, each giving two views (CIFAR-10 train images, uint8). The same recipe
everywhere: random resized crop to 32 (scale 0.08-1), horizontal flip 0.5, colour jitter
0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, no blur, output float in [0, 1] (no normalisation).
- selfsup: `build_recipe("simclr")` on uint8 batches in memory (fused path; `selfsup-unfused`:
  the separate ops), batches drawn by random indices;
- lightly: `SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0, normalize=None)`
  per PIL image in a torch DataLoader with 0 or 2 worker processes;
- kornia: the same ops from kornia.augmentation, batched, on float batches.
The first batch (worker start-up, allocations) is not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

DATA = Path(
    os.environ.get("SELFSUP_BENCH_CIFAR")  # another copy, e.g. on a GPU machine
    or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10" / "train-1.npz"
)


def load(n: int) -> np.ndarray:
    return np.load(DATA)["x"][:n]  # n×32×32×3 uint8


def selfsup_batches(x: np.ndarray, batch: int, fuse: bool):
    from selfsup.image.augment import Augment, build_recipe

    aug = Augment(build_recipe("simclr", (32, 32), 3).steps, fuse=fuse)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    while True:
        idx = torch.randint(len(images), (batch,), generator=g)
        xb = images[idx]
        yield aug(xb, g), aug(xb, g)


def kornia_batches(x: np.ndarray, batch: int):
    import kornia.augmentation as K

    aug = K.AugmentationSequential(
        K.RandomResizedCrop((32, 32), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
    )
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    while True:
        xb = images[torch.randint(len(images), (batch,))].float().div_(255)
        yield aug(xb), aug(xb)


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, transform) -> None:  # type: ignore[no-untyped-def]
        self.x, self.transform = x, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i]))


def lightly_batches(x: np.ndarray, batch: int, workers: int):
    from lightly.transforms import SimCLRTransform

    transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0, normalize=None)
    loader = torch.utils.data.DataLoader(
        _PILDataset(x, transform), batch_size=batch, shuffle=True, num_workers=workers
    )
    while True:
        yield from loader


def measure(config: H.Config) -> dict:
    batch, n_batches = config["batch"], config["batches"]
    x = load(batch * (n_batches + 1))
    impl = config["impl"]
    if impl.startswith("selfsup"):
        batches = selfsup_batches(x, batch, fuse=impl == "selfsup")
    elif impl == "kornia":
        batches = kornia_batches(x, batch)
    else:
        batches = lightly_batches(x, batch, workers=int(impl.split("-w")[1]))
    views = next(batches)  # start-up, not timed
    assert views[0].shape == (batch, 3, 32, 32), views[0].shape
    start = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    seconds = time.perf_counter() - start
    return {"images_per_s": batch * n_batches / seconds}


IMPLS = ("selfsup", "selfsup-unfused", "kornia", "lightly-w0", "lightly-w2")


def build_configs(args: argparse.Namespace) -> list[H.Config]:
    return [{"impl": i, "batch": args.batch, "batches": args.batches} for i in IMPLS]


def report(configs: list[H.Config], results: list[list]) -> None:
    rate = {c["impl"]: H.median(r, "images_per_s") for c, r in zip(configs, results, strict=True)}
    ref = rate.get("lightly-w2")
    print(f"\ntwo-view SimCLR augmentation, 32 px, batch {configs[0]['batch']}: images/s (median)")
    for impl, v in rate.items():
        ratio = f"{v / ref:6.2f}x lightly-w2" if v and ref else ""
        print(f"  {impl:16s} {v if v is None else round(v):>8} {ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per process")
    H.main(measure, build_configs, report, parser)
