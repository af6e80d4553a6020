"""Training throughput of the momentum and non-contrastive methods: selfsup vs lightly-built loops.

    python benchmarks/method_throughput.py                     # all seven, ConvNet, 3 rounds
    python benchmarks/method_throughput.py --methods byol,dino --backbone resnet18 --steps 3

Source images per second over `--steps` SGD steps after one untimed step, batch `--batch` (256)
of CIFAR-10 train images at 32 px, the same backbone (selfsup's `build_backbone`, small-image
stem) and SGD (lr 0.06, momentum 0.9, weight decay 5e-4) on both sides, each step complete:
views, forward, loss, backward, update, and the momentum (EMA) update of the target where the
method has one.
- selfsup: the method's own module (`selfsup.image.methods`, default options: heads, loss,
  views from its default recipe, fused and batched on uint8 tensors in memory); `pretext_loss`, then
  `update_targets` (`ema_update` of its `momentum_targets`) where it has momentum targets.
- lightly: the same method as lightly's examples build it -- its heads sized like selfsup's
  defaults, its loss, `update_momentum` and `deactivate_requires_grad`, and its transform for
  the method (`input_size=32`, no blur) per PIL image in a DataLoader with `--workers` workers.
  MoCo v2 uses `NTXentLoss`'s memory bank (4,096 keys) and is symmetrised as selfsup's is; lightly
  has no MoCo v3 head, so v3 takes its MoCo head with batch norm and its BYOL predictor.

The heads are lightly's own (e.g. SimSiam's and Barlow Twins' projectors have three layers where
selfsup's defaults have two), so the ratio is what a user of each library gets by default with
the same backbone; on the ConvNet and ResNet-18 the backbone dominates the step.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402
from augment import _PILDataset, load  # noqa: E402

METHODS = ("moco", "moco-v3", "byol", "simsiam", "dino", "vicreg", "barlow-twins")
LR = 0.06
MOMENTUM = 0.99


def selfsup_step(method: str, backbone: str, x, batch: int):  # type: ignore[no-untyped-def]
    from selfsup.image.methods import get_method
    from selfsup.image.methods.siamese import Momentum

    info = {
        "dataset": {"channels": 3, "image_size": [32, 32], "num_classes": 0},
        "encoder": {"backbone": backbone, "in_channels": 3, "small_images": True,
                    "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]},
    }  # fmt: skip
    model = get_method(method).create(info, method=method, backbone=backbone).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    unlabeled = torch.full((batch,), -1)

    def step() -> float:
        xb = images[torch.randint(len(images), (batch,), generator=g)]
        loss, _ = model.pretext_loss(xb, unlabeled, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if isinstance(model, Momentum):
            model.update_targets(MOMENTUM)
        return loss.item()

    return step


def _frozen(module: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    copy_ = copy.deepcopy(module)
    deactivate_requires_grad(copy_)
    return copy_


def lightly_step(method: str, backbone: str, x, batch: int, workers: int):  # type: ignore[no-untyped-def]
    from lightly import loss as losses
    from lightly import transforms as T
    from lightly.models.modules import heads
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from selfsup.image.models.backbones import build_backbone

    net, dim = build_backbone(backbone, 3, small_images=True)
    net = nn.Sequential(net, nn.Flatten())
    no_blur = {"input_size": 32, "gaussian_blur": 0.0}
    targets: list[tuple[nn.Module, nn.Module]] = []
    if method in ("moco", "moco-v3"):
        v3 = method == "moco-v3"
        projection = (
            heads.MoCoProjectionHead(dim, 1024, 256, batch_norm=True)
            if v3
            else heads.MoCoProjectionHead(dim, 512, 128)
        )
        query = nn.Sequential(net, projection)
        key = _frozen(query)
        predictor = heads.BYOLPredictionHead(256, 1024, 256) if v3 else nn.Identity()
        targets = [(key, query)]
        transform = T.MoCoV2Transform(**no_blur)
        online = nn.ModuleList([query, predictor])
        if v3:
            criterion = losses.NTXentLoss(temperature=1.0)
        else:
            criterion = losses.NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))

        def loss_of(views):  # type: ignore[no-untyped-def]
            q0, q1 = (predictor(query(v)) for v in views)
            with torch.no_grad():
                k0, k1 = (key(v) for v in views)
            return (criterion(q0, k1) + criterion(q1, k0)) / 2

    elif method in ("byol", "simsiam"):
        if method == "byol":
            projection = heads.BYOLProjectionHead(dim, 1024, 256)
            predictor = heads.BYOLPredictionHead(256, 1024, 256)
            transform = T.BYOLTransform(
                T.BYOLView1Transform(**no_blur), T.BYOLView2Transform(**no_blur)
            )
        else:
            projection = heads.SimSiamProjectionHead(dim, 512, 512)
            predictor = heads.SimSiamPredictionHead(512, 128, 512)
            transform = T.SimSiamTransform(**no_blur)
        student = nn.Sequential(net, projection)
        teacher = _frozen(student) if method == "byol" else student
        if method == "byol":
            targets = [(teacher, student)]
        online = nn.ModuleList([student, predictor])
        criterion = losses.NegativeCosineSimilarity()

        def loss_of(views):  # type: ignore[no-untyped-def]
            z = [student(v) for v in views]
            p = [predictor(zi) for zi in z]
            with torch.no_grad():
                t = [teacher(v).detach() for v in views] if method == "byol" else None
            t = t or [zi.detach() for zi in z]
            return (criterion(p[0], t[1]) + criterion(p[1], t[0])) / 2

    elif method == "dino":
        student = nn.Sequential(net, heads.DINOProjectionHead(dim, 512, 128, 1024))
        # its weight-normed last layer cannot be deep-copied: a fresh head takes the weights
        teacher = nn.Sequential(copy.deepcopy(net), heads.DINOProjectionHead(dim, 512, 128, 1024))
        teacher.load_state_dict(student.state_dict())
        deactivate_requires_grad(teacher)
        targets = [(teacher, student)]
        online = student
        transform = T.DINOTransform(
            global_crop_size=32, n_local_views=0, gaussian_blur=(0.0, 0.0, 0.0)
        )
        criterion = losses.DINOLoss(output_dim=1024, warmup_teacher_temp_epochs=0)

        def loss_of(views):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                t = [teacher(v) for v in views]
            return criterion(t, [student(v) for v in views], epoch=0)

    else:  # vicreg, barlow-twins
        if method == "vicreg":
            projection = heads.VICRegProjectionHead(dim, 512, 512, num_layers=2)
            criterion = losses.VICRegLoss()
            transform = T.VICRegTransform(**no_blur)
        else:
            projection = heads.BarlowTwinsProjectionHead(dim, 512, 512)
            criterion = losses.BarlowTwinsLoss(lambda_param=5e-3)
            transform = T.BYOLTransform(
                T.BYOLView1Transform(**no_blur), T.BYOLView2Transform(**no_blur)
            )
        online = nn.Sequential(net, projection)

        def loss_of(views):  # type: ignore[no-untyped-def]
            return criterion(*(online(v) for v in views))

    opt = torch.optim.SGD(
        [p for p in online.parameters() if p.requires_grad], lr=LR, momentum=0.9, weight_decay=5e-4
    )
    loader = torch.utils.data.DataLoader(
        _PILDataset(x, transform), batch_size=batch, shuffle=True, num_workers=workers,
        drop_last=True, persistent_workers=workers > 0,
    )  # fmt: skip

    def batches():  # type: ignore[no-untyped-def]
        while True:
            yield from loader

    views_of = batches()
    online.train()

    def step() -> float:
        views = list(next(views_of))[:2]
        loss = loss_of(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for target, source in targets:
            update_momentum(source, target, MOMENTUM)
        return loss.item()

    return step


def measure(config: H.Config) -> dict:
    batch, steps = config["batch"], config["steps"]
    x = load(batch * (steps + 2))
    if config["impl"] == "lightly":
        step = lightly_step(config["method"], config["backbone"], x, batch, config["workers"])
    else:
        step = selfsup_step(config["method"], config["backbone"], x, batch)
    step()  # start-up: workers, allocations, first touch
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = time.perf_counter() - start
    return {"images_per_s": batch * steps / seconds, "last_loss": losses[-1]}


def build_configs(args: argparse.Namespace) -> list[H.Config]:
    return [
        {"method": m, "impl": impl, "backbone": args.backbone, "batch": args.batch,
         "steps": args.steps, "workers": args.workers}
        for m in args.methods
        for impl in ("selfsup", "lightly")
    ]  # fmt: skip


def report(configs: list[H.Config], results: list[list]) -> None:
    rate = {
        (c["method"], c["impl"]): H.median(r, "images_per_s")
        for c, r in zip(configs, results, strict=True)
    }
    c = configs[0]
    print(f"\ntraining throughput, {c['backbone']}, batch {c['batch']}, 32 px: images/s (median)")
    print(f"  {'method':13s} {'selfsup':>8s} {'lightly':>8s}  ratio")
    for method in dict.fromkeys(m for m, _ in rate):
        ours, theirs = rate.get((method, "selfsup")), rate.get((method, "lightly"))
        ratio = f"{ours / theirs:5.2f}x" if ours and theirs else "  -"
        shown = [f"{v:8.1f}" if v else "  failed" for v in (ours, theirs)]
        print(f"  {method:13s} {shown[0]} {shown[1]}  {ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--workers", type=int, default=2, help="the lightly loop's loader workers")
    H.main(measure, build_configs, report, parser, timeout=1800)
