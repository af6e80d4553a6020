"""`selfsup samples RUN`: redraw a run's sample grid from one of its checkpoints.

The method is rebuilt from RUN/config.yaml (the registry gives its class), loaded with the
checkpoint's weights (`weights_only=True`) and asked for its grid on the same images the
training run drew: the first images of the first epoch's first batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.image.config import PretrainConfig
from selfsup.image.methods.base import Method

SAMPLE_COUNT = 8  # as many images as the training run's SaveSamples callback draws


def find_checkpoint(run: Path, checkpoint: str) -> Path:
    """'last', 'best' (what Lightning's ModelCheckpoint kept as best; with no metric monitored,
    the latest epoch) or a path."""
    folder = run / rundir.CHECKPOINTS
    if checkpoint not in ("last", "best"):
        path = Path(checkpoint)
        if not path.is_file():
            raise SelfsupError(f"--checkpoint {checkpoint}: no such file")
        return path
    last = rundir.last_checkpoint(run)
    if last is None:
        raise SelfsupError(f"--checkpoint {checkpoint}: {folder} has no last.ckpt (no epoch ended)")
    if checkpoint == "last":
        return last
    for state in rundir.load_checkpoint(last).get("callbacks", {}).values():
        best = state.get("best_model_path") if isinstance(state, dict) else None
        if best and (folder / Path(best).name).is_file():  # by name: the run may have moved
            return folder / Path(best).name
    raise SelfsupError(f"--checkpoint best: {last} records no best checkpoint in {folder}")


def load_method(run: str | Path, checkpoint: str = "last") -> tuple[Method, Any, int]:
    """(the run's method with the checkpoint's weights in eval mode, its training data, epoch)."""
    from selfsup.image.methods import METHODS, get_method
    from selfsup.image.train import config_from_saved

    run = Path(run)
    saved = rundir.read_config(run)
    if saved.get("method") not in METHODS:
        raise SelfsupError(f"{run / rundir.CONFIG}: method {saved.get('method')!r} is unknown")
    state = rundir.load_checkpoint(find_checkpoint(run, checkpoint))
    config = dataclasses.replace(config_from_saved(saved), out=str(run), resume=None)
    method_class = get_method(config.method)
    options = METHODS.build(config.method, config.options)
    train, _, extra = method_class.load_data(config, options)
    data_info = {k: saved[k] for k in ("dataset", "encoder")}
    method = method_class(config, data_info, options, **extra)
    try:
        method.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise SelfsupError(
            f"the checkpoint does not fit the {config.method} model of {run / rundir.CONFIG} "
            f"({str(e).splitlines()[0]})"
        ) from None
    return method.eval(), train, int(state.get("epoch", 0))


def sample_images(train: Any, config: PretrainConfig, count: int = SAMPLE_COUNT) -> torch.Tensor:
    """The images the training run drew: the first of epoch 0's first batch."""
    from selfsup.image.data import batch_loader

    loader = batch_loader(train, config.batch_size, shuffle=True, drop_last=True, seed=config.seed)
    return next(iter(loader))[0][:count]


def regenerate_samples(
    run: str | Path,
    *,
    checkpoint: str = "last",
    out: str | Path | None = None,
    beside: list[str | Path] | tuple[str | Path, ...] = (),
) -> Path:
    """Redraw RUN's sample grid from a checkpoint; returns the PNG's path (default
    RUN/samples/regenerated/epochNNN.png). `beside`: further inpainting runs whose paintings
    of the same images are drawn as extra rows (the lecture's L2 vs L2 + adversarial figure)."""
    method, train, epoch = load_method(run, checkpoint)
    x = sample_images(train, method.config)
    name = f"epoch{epoch:03d}.png"
    path = Path(out) if out else rundir.inside_run(run, "samples", "regenerated", name)
    if path.suffix.lower() != ".png":
        raise SelfsupError(f"-o {path}: the sample grid is written as PNG; name a .png file")
    with torch.no_grad():
        if beside:
            from selfsup.image.methods.inpainting import Inpainting, inpaint_grid

            others = [load_method(other, "last")[0] for other in beside]
            if not all(isinstance(m, Inpainting) for m in (method, *others)):
                raise SelfsupError("--beside draws inpainting runs side by side; all must be one")
            shape = method.data_info["dataset"]
            for other, m in zip(beside, others, strict=True):
                if m.data_info["dataset"]["image_size"] != shape["image_size"]:
                    raise SelfsupError(f"--beside {other}: its images differ in size from {run}'s")
            inpaint_grid(method, x, path, *others)  # type: ignore[arg-type]
        else:
            method.save_samples(x, path)
    return path
