"""Peak memory of one SimCLR step at one effective batch, with and without `--accumulate`.

    python benchmarks/accumulate_memory.py [--batch 1024] [--accumulate 1,4,16] [--image-size 32]

Each K runs in a fresh subprocess (ResNet-18 with the small-image stem, random uint8 images,
float32 on the CPU, one optimiser step through Lightning as `selfsup pretrain` takes it) and
reports that process's peak resident memory, its resident memory before the step, and the
step's wall time. With gradient caching (K > 1) the step is the same optimiser step as K = 1:
the activations of one micro-batch (batch/K images, two views each) are held at a time, for the
price of one more forward pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def child(batch: int, k: int, size: int, threads: int) -> dict[str, float]:
    import lightning as L

    from selfsup.image.methods.simclr import SimCLR

    torch.set_num_threads(threads)
    info = {
        "dataset": {"channels": 3, "image_size": [size, size], "num_classes": 0},
        "encoder": {
            "backbone": "resnet18",
            "in_channels": 3,
            "small_images": True,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
        },
    }
    method = SimCLR.create(info, backbone="resnet18", batch_size=batch // k, accumulate=k)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader([(x, torch.full((batch,), -1))], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = rss_gib()
    began = time.perf_counter()
    trainer.fit(method, loader)
    return {"before": before, "peak": rss_gib(), "seconds": time.perf_counter() - began}


def rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="effective batch (images)")
    parser.add_argument("--accumulate", default="1,4,16", help="comma list of K")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a.batch, a.child, a.image_size, a.threads)))
        return
    print(f"SimCLR ResNet-18, {a.image_size} px, effective batch {a.batch}, float32 CPU")
    print(f"{'K':>3} {'micro':>6} {'peak RSS GiB':>13} {'step GiB':>9} {'step s':>7}")
    for k in (int(v) for v in a.accumulate.split(",")):
        argv = [sys.executable, __file__, "--child", str(k), "--batch", str(a.batch)]
        argv += ["--image-size", str(a.image_size), "--threads", str(a.threads)]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            print(f"{k:>3} failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        step = r["peak"] - r["before"]
        print(f"{k:>3} {a.batch // k:>6} {r['peak']:>13.2f} {step:>9.2f} {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
