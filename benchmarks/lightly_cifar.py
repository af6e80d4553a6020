"""The side-by-side reference for the CIFAR-10 recipes: a lightly-built loop (SimCLR or VICReg,
whichever method the selfsup run used) trained for the same wall-clock time, saved as a selfsup
run so `selfsup evaluate` scores it exactly like ours.

The loop is the one `train_step.py` times: lightly's transform for the method (`SimCLRTransform`
or `VICRegTransform`, CIFAR settings: 32 px, colour-jitter strength 0.5, no blur) per PIL image in
a DataLoader with 2 workers, lightly's loss (`NTXentLoss` with the run's temperature, or
`VICRegLoss` with the run's three weights), the same encoder and projection head as the selfsup
run (from its config), AdamW with its learning rate and weight decay (none on biases and norms,
as selfsup does). The schedule is warm-up then cosine over the time budget (the loop cannot know
its epoch count in advance); training stops when the budget is spent.

    python benchmarks/lightly_cifar.py --like runs/cifar-wide --minutes 28.8 \
        --out runs/cifar-lightly
    selfsup evaluate runs/cifar-lightly --fractions 0.01,0.1,1 --seeds 3 --baselines none \
        --no-kmeans
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from augment import _PILDataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--like", required=True, help="the selfsup run whose encoder and budget to match"
    )
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup-fraction", type=float, default=1 / 18, help="of the budget")
    args = parser.parse_args()

    from lightly.loss import NTXentLoss, VICRegLoss
    from lightly.transforms import SimCLRTransform, VICRegTransform

    from selfsup.core.run import ENCODER, read_config
    from selfsup.engine.optim import parameter_groups
    from selfsup.image.data import load_splits
    from selfsup.image.models import Encoder, ProjectionHead
    from selfsup.image.runs import export_encoder

    config = read_config(args.like)
    torch.manual_seed(config["seed"])
    encoder = Encoder(**config["encoder"])
    method = config["method"]
    cifar = {"input_size": 32, "cj_strength": 0.5, "gaussian_blur": 0.0, "normalize": None}
    if method == "simclr":
        layers = 2
        loss_fn: nn.Module = NTXentLoss(temperature=config["temperature"])
        transform = SimCLRTransform(**cifar)
    elif method == "vicreg":
        layers = 3  # selfsup's VICReg expander
        loss_fn = VICRegLoss(config["invariance"], config["variance"], config["covariance"])
        transform = VICRegTransform(**cifar)
    else:
        raise SystemExit(f"{args.like}: a {method} run; this reference covers simclr and vicreg")
    head = ProjectionHead(
        encoder.feature_dim, config["projection_hidden"], config["projection_dim"], layers
    )
    model = nn.Sequential(encoder, head).train()
    lr = config["lr"] or 1e-3  # selfsup's AdamW default when the run left it unset
    optimizer = torch.optim.AdamW(parameter_groups([model], config["weight_decay"]), lr)
    train, _ = load_splits(config["data"], data_dir=config["data_dir"], limit=config["limit"])
    images = train.x.permute(0, 2, 3, 1).numpy()  # the run's own training images, N×H×W×C
    loader = torch.utils.data.DataLoader(
        _PILDataset(images, transform), batch_size=config["batch_size"], shuffle=True,
        num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0,
    )  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    shutil.copy(Path(args.like) / "config.yaml", out / "config.yaml")
    (out / "command.txt").write_text(" ".join(sys.argv) + "\n")

    budget, start, steps, epoch = args.minutes * 60, time.perf_counter(), 0, 0
    bar = tqdm(total=int(budget), desc="lightly loop", unit="s")
    while (elapsed := time.perf_counter() - start) < budget:
        for (v0, v1), _ in zip(loader, range(len(loader)), strict=False):
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            t = elapsed / budget
            w = args.warmup_fraction
            factor = t / w if t < w else 0.5 * (1 + math.cos(math.pi * (t - w) / (1 - w)))
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            loss = loss_fn(model(v0), model(v1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            bar.n = int(elapsed)
            bar.set_postfix(epoch=epoch, step=steps, loss=f"{loss.item():.3f}")
        epoch += 1
    bar.close()
    export_encoder(encoder, out / ENCODER)
    seen = steps * config["batch_size"]
    print(
        f"lightly loop: {steps} steps ({seen / len(images):.2f} epochs, {seen / budget:.0f} "
        f"images/s) in {budget / 60:.1f} min; encoder in {out}"
    )


if __name__ == "__main__":
    main()
