"""A folder of photo-sized JPEGs: the loader's images/s against the decode limit and the model.

    python benchmarks/photo_loader.py                  # 5,000 files, all three sizes
    python benchmarks/photo_loader.py --quick          # the first 1,000 files, fewer steps
    python benchmarks/photo_loader.py --memory 100000  # also: RSS on a 100,000-file folder

Makes once (cached in --dir) 5,000 JPEGs of 500×375 px (quality 90) from the 1,000 Flickr8k
photos of ../shared/data (64 px: each upscaled from a random crop, mirrored half the time, with
pixel noise of std 10 so that the files weigh what photos of that size do, about 70 KB), then
measures, for 96/160/224-px targets, with W = `default_workers()` processes on both sides:

- decode limit: W processes (a multiprocessing pool, no DataLoader) decoding the files at the
  reduced size (PIL `draft`: the smallest DCT scale that keeps the target), and at full size with
  torchvision's `decode_jpeg` (libjpeg-turbo); the faster one is the limit. Nothing else: no
  crop, no resize, no batching;
- loader: the folder as pretraining streams it (`load_splits(..., stream=True)`: `FolderImages`
  in `batch_loader` with W workers: decode, centre square, uint8 resize, batches of 64 sent to the
  main process), timed from the first batch; "+ views": SimCLR's two augmented views of every
  batch made in the main process, as `pretext_loss` does (on the GPU when there is one);
- SimCLR step: ResNet-18 SimCLR (views, forward, loss, backward, SGD) on batches already in
  memory (bf16 autocast on a GPU), so the table shows which of the three is the bottleneck.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "pairs-64px.npz"
SIZE = (500, 375)
SIZES = (96, 160, 224)


def _write(args: tuple[Path, np.ndarray, int]) -> None:
    from PIL import Image

    folder, photos, i = args
    rng = np.random.default_rng(i)
    photo = photos[i % len(photos)]
    top, left = rng.integers(0, 9, 2)
    im = Image.fromarray(photo[top : top + 56, left : left + 56]).resize((500, 500), Image.BICUBIC)
    px = np.asarray(im.crop((0, 62, 500, 437)), dtype=np.float32)
    px = px[:, ::-1] if rng.random() < 0.5 else px
    px = (px + rng.normal(0, 10, px.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(px).save(folder / f"{i:05d}.jpg", quality=90)


def make_folder(folder: Path, count: int, workers: int) -> Path:
    """`count` JPEGs of 500×375 in `folder`, made once (a complete folder is reused)."""
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos = np.load(DATA, allow_pickle=False)["x"]
    start = time.perf_counter()
    with mp.Pool(workers) as pool:
        pool.map(_write, [(folder, photos, i) for i in range(count)], chunksize=64)
    print(f"made {count} JPEGs in {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def _decode_chunk(args: tuple[list[str], str, int]) -> int:
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg, read_file

    torch.set_num_threads(1)
    files, decoder, size = args
    for f in files:
        if decoder == "torchvision":
            decode_jpeg(read_file(f))
        else:
            with Image.open(f) as im:
                w, h = im.size
                s = size / min(w, h)
                im.draft("RGB", (max(size, round(w * s)), max(size, round(h * s))))
                np.asarray(im.convert("RGB"))
    return len(files)


def decode_limit(files: list[str], decoder: str, size: int, pool: mp.pool.Pool) -> float:
    """Images/s of `pool` decoding `files` (a warm-up pass over the first 64 first)."""
    chunks = [(files[i : i + 32], decoder, size) for i in range(0, len(files), 32)]
    pool.map(_decode_chunk, chunks[:2])
    start = time.perf_counter()
    n = sum(pool.map(_decode_chunk, chunks, chunksize=1))
    return n / (time.perf_counter() - start)


def loader_rate(spec: str, size: int, n: int, workers: int, views: bool, device: str) -> float:
    """Images/s of the streaming folder loader (with SimCLR's two views when `views`)."""
    import torch

    from selfsup.image.augment import build_recipe
    from selfsup.image.data import batch_loader, load_splits

    train, _ = load_splits(spec, image_size=size, stream=True)
    loader = batch_loader(
        train.subset(range(min(n, len(train)))), 64, shuffle=True, drop_last=False,
        num_workers=workers,
    )  # fmt: skip
    augment = build_recipe("simclr", (size, size), 3).to(device)
    g = torch.Generator(device).manual_seed(0)
    seen, start = 0, 0.0
    for i, (x, _) in enumerate(loader):
        if views:
            x = x.to(device, non_blocking=True)
            augment(x, g), augment(x, g)  # noqa: B018
            if device == "cuda":
                torch.cuda.synchronize()
        if i == 0:  # the workers' start is not the loader's rate
            start = time.perf_counter()
        else:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def simclr_rate(size: int, batch: int, steps: int, device: str) -> float:
    """Images/s of ResNet-18 SimCLR training steps at `size` px (views included)."""
    import torch

    from selfsup.image.methods import get_method

    info = {
        "dataset": {"channels": 3, "image_size": [size, size], "num_classes": 0},
        "encoder": {"backbone": "resnet18", "in_channels": 3, "small_images": False,
                    "mean": [0.45] * 3, "std": [0.25] * 3},
    }  # fmt: skip
    model = get_method("simclr").create(info, method="simclr", backbone="resnet18")
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.full((batch,), -1, device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _ = model.pretext_loss(x, y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


MEMORY_CHILD = """
import resource, sys, time
from selfsup.image.data import batch_loader, load_splits
from selfsup.image.data.images import default_workers
def rss():  # MiB: resident in all, and its anonymous / file-backed / shared-memory parts
    kb = {k: int(v.split()[0]) for k, _, v in (l.partition(':') for l in open('/proc/self/status'))
          if k in ('VmRSS', 'RssAnon', 'RssFile', 'RssShmem')}
    return ' '.join(str(kb[k] // 1024) for k in ('VmRSS', 'RssAnon', 'RssFile', 'RssShmem'))
print('imports', rss(), flush=True)
train, _ = load_splits('folder:' + sys.argv[1], image_size=224)
print('listed', rss(), len(train), train.x is None, default_workers(), flush=True)
loader = batch_loader(train, 64, shuffle=True, drop_last=True, num_workers=default_workers())
for i, _ in enumerate(loader):
    float(_[0].float().mean())  # its pages touched, as training does
    if i % 10 == 0:
        print(i, rss(), flush=True)
    if i == int(sys.argv[2]):
        break
print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)
del loader, _  # the workers end: their peak is counted below
time.sleep(1)
print('workers', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, flush=True)
"""


def memory(folder: Path, count: int, batches: int) -> None:
    """RSS of the main process while loading a `count`-file folder (hard links to one small
    JPEG) at 224 px and drawing `batches` batches of 64 from it, every 10 batches."""
    from PIL import Image

    if len(list(folder.glob("*.jpg"))) < count:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(count):  # a file system allows some 65,000 links to one file
            name = folder / f"{i:08d}.jpg"
            if i % 50_000 == 0:
                Image.new("RGB", (32, 24), (90, 120, 150)).save(source := name)
            else:
                os.link(source, name)
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(folder), str(batches)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    lines = [line.split() for line in done.stdout.splitlines()]
    n, lazy, workers = lines[1][5:8]
    print(
        f"\n{n} files at 224 px (held in memory: {lazy != 'True'}), batches of 64 from "
        f"{workers} workers; main process MiB: RSS (anonymous, file, shared memory)"
    )
    for line in lines[:-2]:
        print(f"{line[0]:>8} {line[1]:>6} ({line[2]}, {line[3]}, {line[4]})")
    print(f"peak {lines[-2][1]} MiB; largest worker's peak {lines[-1][1]} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/selfsup-photo-loader", help="where files are kept")
    parser.add_argument("--count", type=int, default=5000, help="JPEGs in the folder")
    parser.add_argument("--quick", action="store_true", help="1,000 files, 1 step per size")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--memory", type=int, default=0, help="also: peak RSS on N files")
    parser.add_argument("--batches", type=int, default=150, help="drawn in --memory")
    parser.add_argument("--rounds", type=int, default=2, help="limit and loader: best of N")
    args = parser.parse_args()

    import torch

    from selfsup.image.data.images import default_workers

    workers = default_workers()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = make_folder(Path(args.dir) / f"jpeg-{args.count}", args.count, workers)
    files = sorted(str(p) for p in folder.glob("*.jpg"))[: 1000 if args.quick else args.count]
    mean_kb = np.mean([os.path.getsize(f) for f in files[:200]]) / 1024
    batch, steps = (128, 10) if device == "cuda" else (8, 1) if args.quick else (16, 3)
    print(
        f"{len(files)} JPEGs of {SIZE[0]}×{SIZE[1]} (mean {mean_kb:.0f} KB), {workers} worker "
        f"processes on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), "
        f"views and model on {device}; SimCLR batch {batch}, {steps} steps"
    )
    head = (
        f"{'size':>4} {'decoder':>11} {'limit/s':>8} {'loader/s':>9} {'ratio':>6} "
        f"{'+views/s':>9} {'ratio':>6} {'simclr/s':>9}  bottleneck"
    )
    print(head, flush=True)
    tv = None
    with mp.get_context("fork").Pool(workers) as pool:
        for size in map(int, args.sizes.split(",")):
            plain, rates = 0.0, {"pil-draft": 0.0, "torchvision": tv or 0.0}
            for _ in range(args.rounds):  # alternated, the best of each: a shared machine
                rates["pil-draft"] = max(
                    rates["pil-draft"], decode_limit(files, "pil-draft", size, pool)
                )
                if tv is None:  # full size whatever the target: measured at the first size
                    rates["torchvision"] = max(
                        rates["torchvision"], decode_limit(files, "torchvision", size, pool)
                    )
                rate = loader_rate(f"folder:{folder}", size, len(files), workers, False, device)
                plain = max(plain, rate)
            tv = rates["torchvision"]
            decoder, limit = max(rates.items(), key=lambda kv: kv[1])
            views = loader_rate(f"folder:{folder}", size, len(files), workers, True, device)
            model = simclr_rate(size, batch, steps, device)
            slowest = min(("loader", views), ("model", model), key=lambda kv: kv[1])[0]
            print(
                f"{size:4d} {decoder:>11} {limit:8.0f} {plain:9.0f} {plain / limit:6.2f} "
                f"{views:9.0f} {views / limit:6.2f} {model:9.1f}  {slowest}",
                flush=True,
            )
    if args.memory:
        memory(Path(args.dir) / f"links-{args.memory}", args.memory, args.batches)


if __name__ == "__main__":
    main()
