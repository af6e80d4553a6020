"""Fine-tuning a copy of an encoder plus a linear head: all of it, its last K blocks or none."""

from __future__ import annotations

import copy
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from selfsup.core.errors import NonFiniteLossError, SelfsupError
from selfsup.image.augment import build_recipe
from selfsup.image.data.images import ImageData

from .features import extract_features


class Classifier(nn.Module):
    """An encoder followed by a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # deterministic without touching the global RNG
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _trainable_modules(encoder: nn.Module, trainable: str) -> list[nn.Module]:
    """The encoder modules to train for a --finetune value ("all", "none" or "last-K")."""
    if trainable == "all":
        return [encoder]
    if trainable == "none":
        return []
    blocks = list(encoder.blocks())
    match = re.fullmatch(r"last-(\d+)", trainable)
    if match is None or not 1 <= int(match[1]) <= len(blocks):
        raise SelfsupError(
            f"--finetune: expected 'all', 'none' or 'last-K' with 1 <= K <= {len(blocks)}, "
            f"got {trainable!r}"
        )
    return blocks[-int(match[1]) :]


def num_classes_of(*datasets: ImageData) -> int:
    return max(max(len(d.classes or []), int(d.y.max()) + 1) for d in datasets if d.y is not None)


_INIT_LOCK = threading.Lock()  # trainings run in parallel threads share the global RNG


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Module initialisations drawn from a fixed global seed, alone (a lock: another thread's
    draws cannot interleave) and leaving the caller's RNG state untouched."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fit_classifier(
    encoder: nn.Module,
    train: ImageData,
    *,
    num_classes: int | None = None,
    trainable: str = "all",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: str = "light",
    steps: int | None = None,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    progress: bool = False,
    val: ImageData | None = None,
    patience: int = 5,
    eval_every: int | None = None,
    info: dict | None = None,
) -> Classifier:
    """Train a copy of `encoder` plus a linear head on the labeled part of `train`.

    Frozen encoder parts get no gradients and stay in eval mode (BN statistics, dropout).
    `steps`, when given, replaces `epochs`: training stops after that many steps. Shuffling and
    augmentation use generators seeded with `seed`, so a seed gives the same model.
    With `val` (labeled), the accuracy on it is measured every `eval_every` steps (default: each
    epoch): training stops after `patience` checks without improvement and returns the best
    model. `info`, when given, receives the steps taken and the best check's step and accuracy.
    """
    if optimizer not in ("adamw", "sgd"):
        raise SelfsupError(f"finetune optimizer: expected 'adamw' or 'sgd', got {optimizer!r}")
    if not train.has_labels:
        raise SelfsupError(f"finetune: the training data {train.name!r} has no labels")
    train = train.subset(torch.nonzero(train.y >= 0).flatten())  # type: ignore[operator]
    encoder = copy.deepcopy(encoder)
    live = _trainable_modules(encoder, trainable)
    encoder.requires_grad_(False)
    for module in live:
        module.requires_grad_(True)
    live_ids = {id(m) for module in live for m in module.modules()}
    frozen = [m for m in encoder.modules() if id(m) not in live_ids]
    with seeded_init(seed):  # the head's initialisation, whatever runs beside this training
        model = Classifier(encoder, num_classes or num_classes_of(train)).to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    )
    bs = min(batch_size, len(train))
    steps_per_epoch = len(train) // bs
    if steps is not None:
        epochs = math.ceil(steps / steps_per_epoch)
    total = steps if steps is not None else epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    aug = build_recipe(augment, train.image_size, train.channels).to(device)
    shuffle_g = torch.Generator().manual_seed(seed)
    aug_g = torch.Generator(device=device).manual_seed(seed)

    bar = tqdm(total=total, desc=f"finetune {trainable}", disable=not progress)
    every = eval_every or steps_per_epoch
    step, best, best_step, best_state, bad = 0, -1.0, 0, None, 0
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=shuffle_g)[: steps_per_epoch * bs]
        for idx in perm.view(steps_per_epoch, bs):
            model.train()
            for module in frozen:
                module.training = False
            x = aug(train.images(idx).to(device), aug_g)
            loss = F.cross_entropy(model(x), train.y[idx].to(device))  # type: ignore[index]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"finetune: loss became {loss.item()}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            step += 1
            if val is not None and step % every == 0:
                acc = classifier_accuracy(model, val, batch_size=max(bs, 256), device=device)
                if acc > best:
                    best, best_step, bad = acc, step, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad += 1
            if bad >= patience or step == total:
                break
        if bad >= patience or step == total:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if info is not None:
        info.update(steps=step, best_step=best_step, val_accuracy=best if val else None)
    return model.eval()


def classifier_accuracy(
    model: nn.Module, data: ImageData, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> float:
    """Accuracy of `model`'s argmax prediction on the labeled part of `data`."""
    logits = extract_features(model, data, batch_size=batch_size, device=device, progress=False)
    y = data.y.numpy()  # type: ignore[union-attr]
    return float(np.mean(logits.argmax(1)[y >= 0] == y[y >= 0]))


def finetune(encoder: nn.Module, train: ImageData, test: ImageData, **options: Any) -> float:
    """Test accuracy after fine-tuning a copy of `encoder` on `train` by `fit_classifier` with
    `options` (its keywords; the classes: those of `train` and `test`)."""
    if not test.has_labels:
        raise SelfsupError(f"finetune: the test data {test.name!r} has no labels")
    model = fit_classifier(encoder, train, num_classes=num_classes_of(train, test), **options)
    return accuracy_on(model, test, options)


def accuracy_on(model: nn.Module, test: ImageData, options: dict[str, Any]) -> float:
    """`classifier_accuracy` on `test` of a model trained with `fit_classifier(**options)`: on
    its device, in batches of at least 256."""
    batch_size = max(options.get("batch_size", 0), 256)
    return classifier_accuracy(
        model, test, batch_size=batch_size, device=options.get("device", "cpu")
    )
