"""FLOP utilisation of training steps: counted FLOPs / wall time against this machine's matmul peak.

    python benchmarks/mfu.py                                  # every method, 3 backbones, GPT
    python benchmarks/mfu.py --methods simclr,vicreg --backbones resnet18:32 --steps 5
    nice -n 5 python benchmarks/mfu.py --quick                # a smoke pass: 3 methods, ConvNet
    python benchmarks/mfu.py --device cuda --gemm 8192        # on a GPU (no profile row)

For the training step of every image method (`selfsup.image.methods.METHODS`, default options,
AdamW as `selfsup pretrain` builds it) on `--backbones` (default the ConvNet at 32 px and
ResNet-18 at 32 px, small-image stem, and 96 px, ImageNet stem), batch `--batch` 256 of CIFAR-10
train images (bilinearly enlarged for 96 px), and for the baby GPT of
benchmarks/gpt_shakespeare.py (batch 12 × 64 characters), two rows per precision:
- step: the method's whole step as the engine runs it with automatic optimisation (views drawn
  from uint8 images, forward, loss, `training_step`'s checks, backward, optimiser and schedule
  step, `on_train_batch_end`: EMA targets, queues, clamps; the GPT's gradient clipping), under
  a stand-in for the Trainer: Lightning's own bookkeeping (logging, progress) is not in it;
- model: forward + backward of the backbone alone (the GPT alone) on a fixed float tensor of
  `--batch` images (the sum of its outputs as the loss), no optimiser.
Precisions: float32, and bf16 autocast (the forward under `torch.autocast`, as Lightning's
`bf16-mixed`) where this machine has bf16 matrix units (`--precisions 32,bf16` forces it); conv
backbones run channels_last in both (the encoder's default).

FLOPs are counted once per row by `torch.utils.flop_counter.FlopCounterMode` on one step: matrix
products, convolutions and attention, forward and backward, from their shapes. Elementwise ops,
normalisation, pooling, augmentation, losses' reductions and the optimiser count nothing, so
GFLOP/s and "of peak" are a lower bound of the arithmetic done. The peak is an n×n×n GEMM
(`--gemm` 2048) in the row's precision, measured in the same process on the same threads just
before and just after the rows (the better of the two medians of 5). s/step is the median of
`--steps` timed steps after the counted one (which also warms up).

Then a `torch.profiler` breakdown of the 30-minute recipe's step (README "CIFAR-10 in 30
minutes": VICReg, convnet-wide, batch 256, 24-px crops, AdamW, float32): top ops by self CPU
time, the phases of the step, and the share of time in the ops that the FLOP counter counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402
from augment import DATA  # noqa: E402
from gpt_shakespeare import CORPUS, recipe  # noqa: E402

BACKBONES = ("convnet:32", "resnet18:32", "resnet18:96")
QUICK_METHODS = ("simclr", "vicreg", "byol")
POOL = 4096  # images the batches are drawn from
RECIPE = {"method": "vicreg", "backbone": "convnet-wide", "px": 32, "crop_size": 24}
DTYPES = {"32": torch.float32, "bf16": torch.bfloat16}
# the ops FlopCounterMode counts, as the profiler names them
COUNTED = ("conv", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product")


class Labelled(nn.Module):
    """A module whose calls show in the profiler under `name`."""

    def __init__(self, inner: nn.Module, name: str) -> None:
        super().__init__()
        self.inner, self.name = inner, name

    def forward(self, *args: Any) -> Any:
        with torch.profiler.record_function(self.name):
            return self.inner(*args)


def stand_in_trainer(module: Any, steps: int = 1000) -> SimpleNamespace:
    """Attach what a method's hooks read of a Trainer (no logging: `log` does nothing)."""
    trainer = SimpleNamespace(
        estimated_stepping_batches=steps, max_epochs=10, global_step=0, current_epoch=0,
        global_rank=0, local_rank=0, is_global_zero=True, optimizers=[],
    )  # fmt: skip
    module.trainer = trainer
    module.log = lambda *args, **kwargs: None
    return trainer


def cifar(px: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 N×3×px×px images, labels, class names) of the first POOL CIFAR-10 train images."""
    data = np.load(DATA)
    x = torch.from_numpy(data["x"][:POOL]).permute(0, 3, 1, 2).contiguous()
    if px != x.shape[-1]:
        x = nn.functional.interpolate(x.float(), size=(px, px), mode="bilinear")
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x, torch.from_numpy(data["y"][:POOL]), [str(c) for c in data["classes"]]


def build_method(config: H.Config, classes: list[str]) -> nn.Module:
    from selfsup.core.registry import build_options
    from selfsup.image.config import PretrainConfig, split_options
    from selfsup.image.data.captions import CaptionData
    from selfsup.image.methods import get_method

    method, px = config["method"], config["px"]
    own = {"crop_size": config["crop_size"]} if config.get("crop_size") else {}
    if method == "distill":
        own["teacher"] = config["teacher"]
    shared, own = split_options({"method": method, "backbone": config["backbone"], **own})
    cls = get_method(method)
    info = {
        "dataset": {"channels": 3, "image_size": [px, px], "num_classes": 0},
        "encoder": {"backbone": config["backbone"], "in_channels": 3, "small_images": px <= 64,
                    "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]},
    }  # fmt: skip
    extra: dict[str, Any] = {}
    if method == "clip":  # the class names as captions: y is each image's caption group
        captions = [[f"a photo of a {c}.", f"a {c}."] for c in classes]
        extra["captions"] = CaptionData(images=None, captions=captions, templated=True)  # type: ignore[arg-type]
    options = build_options(method, own, cls.Options)
    return cls(PretrainConfig(**shared), info, options, **extra).train()


def image_steps(config: H.Config) -> dict[str, Any]:
    """(the whole step, the backbone alone) as callables, and what they run on."""
    x, labels, classes = cifar(config["px"])
    device = config.get("device", "cpu")
    x, labels = x.to(device), labels.to(device)
    model = build_method(config, classes).to(device)
    trainer = stand_in_trainer(model)
    schedule_config = model.configure_optimizers()
    optimizer = schedule_config["optimizer"]
    schedule = schedule_config["lr_scheduler"]["scheduler"]
    trainer.optimizers = [optimizer]
    uses_labels = config["method"] in ("clip", "supcon")
    g = torch.Generator().manual_seed(0)
    batch = config["batch"]
    kind = torch.device(device).type

    def step(autocast: bool) -> None:
        pick = torch.randint(len(x), (batch,), generator=g).to(device)
        unlabelled = torch.full((batch,), -1, device=device)
        xb, yb = x[pick], labels[pick] if uses_labels else unlabelled
        with (
            torch.autocast(kind, torch.bfloat16, enabled=autocast),
            torch.profiler.record_function("forward+loss"),
        ):
            loss = model.training_step((xb, yb), trainer.global_step)
        optimizer.zero_grad(set_to_none=True)
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimiser"):
            optimizer.step()
            schedule.step()
        with torch.profiler.record_function("on_train_batch_end"):
            model.on_train_batch_end(loss, (xb, yb), trainer.global_step)
        trainer.global_step += 1

    backbone = model.encoder.backbone
    channels = 1 if model.encoder.lightness else 3
    fixed = torch.rand(batch, channels, config["px"], config["px"], device=device)
    if getattr(model.encoder, "channels_last", False):
        fixed = fixed.contiguous(memory_format=torch.channels_last)

    def alone(autocast: bool) -> None:
        with torch.autocast(kind, torch.bfloat16, enabled=autocast):
            out = backbone(fixed)
        out.float().sum().backward()
        backbone.zero_grad(set_to_none=True)

    model.views = Labelled(model.views, "views")
    return {"step": step, "model": alone}


def gpt_steps(config: H.Config) -> dict[str, Any]:
    """The baby GPT's training step (gpt_shakespeare.py's recipe) and the model alone."""
    from selfsup.lm.models.gpt import GPTModule
    from selfsup.lm.options import LMConfig

    settings, options = recipe("baby")
    lm = LMConfig(**settings)
    text = CORPUS.read_text(encoding="utf-8")
    vocab = {c: i + len(GPTModule.SPECIAL_TOKENS) for i, c in enumerate(sorted(set(text)))}
    ids = np.array([vocab[c] for c in text], dtype=np.int64)  # the char tokenizer's ids
    device = config.get("device", "cpu")
    kind = torch.device(device).type
    module = GPTModule(lm, options, len(vocab) + len(GPTModule.SPECIAL_TOKENS)).train()
    module.to(device)
    trainer = stand_in_trainer(module, lm.steps)
    schedule_config = module.configure_optimizers()
    optimizer = schedule_config["optimizer"]
    schedule = schedule_config["lr_scheduler"]["scheduler"]
    trainer.optimizers = [optimizer]
    rng = np.random.default_rng(0)

    def step(autocast: bool) -> None:
        batch = module.make_batch(ids, rng, lm.batch_size).to(device)
        with torch.autocast(kind, torch.bfloat16, enabled=autocast):
            loss = module.training_step(batch, trainer.global_step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), lm.grad_clip)
        optimizer.step()
        schedule.step()
        trainer.global_step += 1

    fixed = module.make_batch(ids, rng, lm.batch_size)[:, :-1].to(device)

    def alone(autocast: bool) -> None:
        with torch.autocast(kind, torch.bfloat16, enabled=autocast):
            out = module.model(fixed)
        out.float().sum().backward()
        module.zero_grad(set_to_none=True)

    return {"step": step, "model": alone}


def profile(config: H.Config) -> dict[str, Any]:
    """The recipe's step under torch.profiler: ops by self CPU time, phases, counted share."""
    step = image_steps({**config, **RECIPE})["step"]
    step(False)  # warm-up
    steps = config["steps"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(False)
    events = prof.key_averages()
    phases = ("views", "forward+loss", "backward", "optimiser", "on_train_batch_end")
    ops = [e for e in events if e.key not in phases and e.key != "ProfilerStep*"]
    total = sum(e.self_cpu_time_total for e in ops)
    counted = sum(e.self_cpu_time_total for e in ops if any(c in e.key for c in COUNTED))
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[: config["top"]]
    per_step = 1e3 * steps  # µs totals -> ms per step
    return {
        "steps": steps,
        "total_ms": total / per_step,
        "counted_share": counted / total,
        "phases": {e.key: e.cpu_time_total / per_step for e in events if e.key in phases},
        "top": [
            [
                e.key,
                e.self_cpu_time_total / per_step,
                e.self_cpu_time_total / total,
                e.count / steps,
            ]
            for e in top
        ],
    }


def measure(config: H.Config) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    if config["kind"] == "profile":
        return profile(config)
    device = config.get("device", "cpu")
    peaks = {
        p: H.matmul_peak(DTYPES[p], config["gemm"], device=device) for p in config["precisions"]
    }
    try:
        steps = gpt_steps(config) if config["kind"] == "gpt" else image_steps(config)
    except Exception as e:  # a method these settings cannot build: one line in the table
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    rows = []
    for precision in config["precisions"]:
        for row, fn in steps.items():
            run = partial(fn, precision == "bf16")
            flops = H.count_flops(run)  # also the warm-up
            seconds = statistics.median(H.timed(run, config["steps"], device))
            rows.append({"precision": precision, "row": row, "flops": flops, "s": seconds})
    for p in peaks:  # measured again after the rows: the better of the two is the peak
        peaks[p] = max(peaks[p], H.matmul_peak(DTYPES[p], config["gemm"], device=device))
    return {"peaks": peaks, "rows": rows}


def build_configs(args: argparse.Namespace) -> list[H.Config]:
    from selfsup.image.methods import METHODS
    from selfsup.image.models.vit import VIT_SIZES

    bf16 = H.has_bf16_matmul(args.device)
    precisions = args.precisions or ["32", *(["bf16"] if bf16 else [])]
    common = {"batch": args.batch, "steps": args.steps, "gemm": args.gemm,
              "precisions": precisions, "device": args.device}  # fmt: skip
    methods = args.methods or (QUICK_METHODS if args.quick else list(METHODS))
    if "distill" in methods and not args.teacher:
        print("distill: skipped (needs --teacher, a frozen teacher to distill from)")
        methods = [m for m in methods if m != "distill"]
    configs, vit_px = [], set()
    for spec in args.backbones:
        backbone, px = spec.split(":")
        for method in methods:
            own = METHODS.load(method).default_backbone
            if own in VIT_SIZES:  # a ViT method (mae): its own backbone, once per size
                if px in vit_px:
                    continue
                vit_px.add(px)
                backbone_of = own
            else:
                backbone_of = backbone
            configs.append({"kind": "image", "method": method, "backbone": backbone_of,
                            "px": int(px), "teacher": args.teacher, **common})  # fmt: skip
    if not args.no_gpt:
        configs.append({"kind": "gpt", "method": "gpt (baby)", "backbone": "gpt", "px": 64,
                        **common})  # fmt: skip
    if not args.no_profile and args.device == "cpu":  # the profile reads CPU time
        configs.append({"kind": "profile", "batch": args.batch, "steps": args.steps,
                        "top": args.top})  # fmt: skip
    return configs


def report(configs: list[H.Config], results: list[list]) -> None:
    rows, peaks, profiled = [], {p: [] for p in DTYPES}, None
    for config, runs in zip(configs, results, strict=True):
        done = [r for r in runs if r is not None]
        if config["kind"] == "profile":
            profiled = done[0] if done else None
            continue
        where = [config["method"], config["backbone"], config["px"]]
        if not done or "error" in done[0]:
            rows.append([*where, "-", "-", done[0]["error"] if done else "failed", *"-----"])
            continue
        for p in done[0]["peaks"]:
            peaks[p] += [r["peaks"][p] for r in done]
        for i, row in enumerate(done[0]["rows"]):
            seconds = statistics.median(r["rows"][i]["s"] for r in done)
            peak = statistics.median(r["peaks"][row["precision"]] for r in done)
            rate = row["flops"] / seconds / 1e9
            rows.append([
                *where, row["precision"], row["row"], f"{row['flops'] / 1e9:.1f}",
                f"{seconds:.3f}", f"{rate:.1f}", f"{peak:.0f}", f"{rate / peak:.1%}",
            ])  # fmt: skip
    c = next(c for c in configs if c["kind"] != "profile")
    shown = ", ".join(f"{p} {statistics.median(v):.0f}" for p, v in peaks.items() if v)
    print(f"\nmatmul peak ({c['gemm']}³ GEMM, median over the runs): {shown} GFLOP/s")
    if "bf16" not in c["precisions"]:
        print("bf16: not run (no bf16 matrix units here: oneDNN would emulate it; "
              "--precisions 32,bf16 forces it)")  # fmt: skip
    print(f"batch {c['batch']}; s/step the median of {c['steps']} steps; peak: the row's own\n")
    header = ["method", "backbone", "px", "precision", "row", "GFLOP/step", "s/step",
              "GFLOP/s", "peak GFLOP/s", "of peak"]  # fmt: skip
    print(H.markdown_table(header, rows))
    if profiled:
        print_profile(profiled)


def print_profile(p: dict[str, Any]) -> None:
    r = RECIPE
    print(f"\n30-minute recipe's step under torch.profiler ({r['method']}, {r['backbone']}, "
          f"{r['crop_size']}-px crops, float32), {p['steps']} steps: {p['total_ms']:.0f} ms of "
          f"self CPU time per step, {p['counted_share']:.0%} of it in the ops FlopCounterMode "
          "counts (convolutions, matrix products)\n")  # fmt: skip
    phases = [
        [
            f"{k} (inside forward+loss)" if k == "views" else k,
            f"{v:.0f}",
            f"{v / p['total_ms']:.0%}",
        ]
        for k, v in p["phases"].items()
    ]
    print(H.markdown_table(["phase", "ms/step", "of step"], phases))
    print()
    top = [
        [f"`{k}`", f"{ms:.1f}", f"{share:.1%}", f"{calls:g}"] for k, ms, share, calls in p["top"]
    ]
    print(H.markdown_table(["op (self CPU time)", "ms/step", "of step", "calls/step"], top))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=lambda s: s.split(","), help="default: every method")
    parser.add_argument("--backbones", type=lambda s: s.split(","), default=list(BACKBONES),
                        help="BACKBONE:PX, comma-separated")  # fmt: skip
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--precisions", type=lambda s: s.split(","),
                        help="32,bf16 (default: bf16 too where it has matrix units)")  # fmt: skip
    parser.add_argument("--gemm", type=int, default=2048, help="side of the peak's GEMM")
    parser.add_argument("--teacher", help="distill's --teacher (distill is skipped without)")
    parser.add_argument("--top", type=int, default=15, help="ops in the profile's table")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU: no profile row)")
    parser.add_argument("--no-gpt", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke pass: 3 methods on the ConvNet, 2 steps"
    )
    if "--quick" in sys.argv:
        parser.set_defaults(steps=2, backbones=["convnet:32"])
    if not any(a.startswith("--rounds") for a in sys.argv):  # every row is a median of steps
        sys.argv[1:1] = ["--rounds", "1"]
    H.main(measure, build_configs, report, parser, timeout=3600)
