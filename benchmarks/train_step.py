"""End-to-end SimCLR training throughput (augmentation + step): selfsup vs a lightly-built loop.

    python benchmarks/train_step.py                          # convnet and resnet18, 3 rounds
    python benchmarks/train_step.py --backbones convnet --steps 20
    python benchmarks/train_step.py --device cuda --backbones resnet18 --batch 512 \
        --resnet-steps 30 --workers 8                       # on a GPU (bf16 autocast)

Source images per second (two views each) over `--steps` SGD steps after one untimed step, batch
256 of CIFAR-10 train images, the same backbone (selfsup's ConvNet 32-64-128-256 or ResNet-18
with the small-image stem), projection head (512 hidden, 128 out), SGD (lr 0.06, momentum 0.9,
weight decay 5e-4) and temperature 0.5 on both sides:
- selfsup: uint8 batches in memory, `build_recipe("simclr")` (fused) twice, `nt_xent`;
  `selfsup-cl` the same with model and views in channels_last;
- lightly: `SimCLRTransform` per PIL image in a DataLoader with `--workers` 2 workers,
  lightly's `NTXentLoss`.
With `--device cuda` both train on the GPU under bf16 autocast: selfsup augments the uint8 batch
on the GPU, lightly's loader augments on the CPU and copies the views over (pinned memory).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402
from augment import _PILDataset, load  # noqa: E402

TEMPERATURE, LR = 0.5, 0.06


def model(backbone: str) -> nn.Module:
    from selfsup.image.models import ProjectionHead
    from selfsup.image.models.backbones import build_backbone

    net, dim = build_backbone(backbone, 3, small_images=True)
    return nn.Sequential(net, ProjectionHead(dim, 512, 128))


def selfsup_batches(x, batch: int, channels_last: bool, device: str):  # type: ignore[no-untyped-def]
    from selfsup.image.augment import build_recipe

    aug = build_recipe("simclr", (32, 32), 3)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    g = torch.Generator(device).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    while True:
        xb = images[torch.randint(len(images), (batch,), generator=g, device=device)]
        yield torch.cat([aug(xb, g), aug(xb, g)]).contiguous(memory_format=fmt)


def lightly_batches(x, batch: int, device: str, workers: int):  # type: ignore[no-untyped-def]
    from lightly.transforms import SimCLRTransform

    transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0, normalize=None)
    loader = torch.utils.data.DataLoader(
        _PILDataset(x, transform), batch_size=batch, shuffle=True, num_workers=workers,
        drop_last=True, pin_memory=device != "cpu", persistent_workers=workers > 0,
    )  # fmt: skip
    while True:
        for v0, v1 in loader:
            yield torch.cat([v0, v1]).to(device, non_blocking=True)


def measure(config: H.Config) -> dict:
    batch, steps, impl = config["batch"], config["steps"], config["impl"]
    device = config.get("device", "cpu")
    x = load(batch * (steps + 2))
    net = model(config["backbone"]).to(device)
    if impl == "lightly":
        from lightly.loss import NTXentLoss

        loss_fn = NTXentLoss(temperature=TEMPERATURE)
        batches = lightly_batches(x, batch, device, config.get("workers", 2))
    else:
        from selfsup.image.losses import nt_xent

        def loss_fn(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
            return nt_xent(z0, z1, TEMPERATURE)

        if impl == "selfsup-cl":
            net = net.to(memory_format=torch.channels_last)
        batches = selfsup_batches(x, batch, impl == "selfsup-cl", device)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    on_gpu = device.startswith("cuda")

    def step() -> float:
        views = next(batches)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            z0, z1 = net(views).chunk(2)
            loss = loss_fn(z0.float(), z1.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step()  # start-up: workers, allocations, first-touch, cuDNN's algorithm search
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]  # .item() in step() waits for the GPU
    seconds = time.perf_counter() - start
    return {"images_per_s": batch * steps / seconds, "last_loss": losses[-1]}


IMPLS = ("selfsup", "selfsup-cl", "lightly")


def build_configs(args: argparse.Namespace) -> list[H.Config]:
    configs = []
    for backbone in args.backbones:
        steps = args.steps if backbone == "convnet" else args.resnet_steps
        for impl in IMPLS:
            configs.append(
                {"backbone": backbone, "impl": impl, "batch": args.batch, "steps": steps,
                 "device": args.device, "workers": args.workers}
            )  # fmt: skip
    return configs


def report(configs: list[H.Config], results: list[list]) -> None:
    rate = {
        (c["backbone"], c["impl"]): H.median(r, "images_per_s")
        for c, r in zip(configs, results, strict=True)
    }
    batch = configs[0]["batch"]
    device = configs[0].get("device", "cpu")
    print(f"\nSimCLR training throughput on {device}, batch {batch}, 32 px: images/s (median)")
    for (backbone, impl), v in rate.items():
        ref = rate.get((backbone, "lightly"))
        ratio = f"{v / ref:5.2f}x lightly" if v and ref else ""
        epochs = f"  ({v * 60 / 50_000:.2f} CIFAR-10 epochs/min)" if v else ""
        shown = "failed" if v is None else f"{v:8.1f}"
        print(f"  {backbone:9s} {impl:11s} {shown} {ratio}{epochs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", type=lambda s: s.split(","), default=["convnet", "resnet18"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, ConvNet")
    parser.add_argument("--resnet-steps", type=int, default=3, help="timed steps, ResNet-18")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast)")
    parser.add_argument("--workers", type=int, default=2, help="the lightly loop's loader workers")
    H.main(measure, build_configs, report, parser, timeout=1800)
