"""The machinery every method shares: encoder, views, optimizer, schedule, online linear probe.

A method only says how a batch of uint8 images becomes a loss (`pretext_loss`); the rest --
devices, precision, checkpoints, resume, logging, progress bars -- comes from Lightning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment import build_recipe
from selfsup.config import PretrainConfig
from selfsup.errors import NonFiniteLossError, SelfsupError
from selfsup.models import Encoder
from selfsup.optim import build_optimizer, parameter_groups, warmup_cosine


class Method(L.LightningModule):
    """Base class: subclasses set up their heads in `__init__` and implement `pretext_loss`.

    A method declares its own defaults: `default_recipe` (None: it draws no augmented views, so
    `--recipe` does not apply) and `default_backbone`; they fill the options a user left unset.
    """

    default_recipe: ClassVar[str | None] = "simclr"
    default_backbone: ClassVar[str] = "convnet"

    @classmethod
    def with_defaults(cls, config: PretrainConfig) -> PretrainConfig:
        """`config` with this method's defaults where the user gave no recipe or backbone."""
        if cls.default_recipe is None and config.recipe not in (None, "none"):
            raise SelfsupError(
                f"--recipe {config.recipe}: {config.method} draws no augmented views; omit --recipe"
            )
        return dataclasses.replace(
            config,
            recipe=config.recipe or cls.default_recipe or "none",
            backbone=config.backbone or cls.default_backbone,
        )

    def __init__(self, config: PretrainConfig, data_info: dict[str, Any]) -> None:
        super().__init__()
        config = self.with_defaults(config)
        self.config = config
        self.data_info = data_info
        self.encoder = Encoder(**data_info["encoder"])
        self.encoder.use_channels_last()
        dataset = data_info["dataset"]
        view_size = (config.crop_size,) * 2 if config.crop_size else tuple(dataset["image_size"])
        self.views = build_recipe(config.recipe, view_size, dataset["channels"])
        num_classes = dataset["num_classes"]
        # Features are standardised (BN without affine) before the online probe: some pretext
        # tasks give features with a large shared offset and little spread, which a plain
        # linear layer trained alongside learns slowly.
        self.probe = (
            nn.Sequential(
                nn.BatchNorm1d(self.encoder.feature_dim, affine=False),
                nn.Linear(self.encoder.feature_dim, num_classes),
            )
            if config.online_probe and num_classes > 1
            else None
        )

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(loss, encoder features of x or of one view of it, for the online probe).

        x: uint8 B×C×H×W; y: int64 B, -1 where unlabeled (only label-using methods read it);
        g: the step's generator (draw all randomness from it so resumed runs match).
        """
        raise NotImplementedError

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Draw what the method does to the uint8 images `x` (views, reconstructions, ...)."""
        from selfsup.augment.preview import view_grid

        g = torch.Generator(device=x.device).manual_seed(self.config.seed)
        with torch.no_grad():
            views = [self.views(x, g) for _ in range(2)]
        view_grid(x.cpu(), [v.cpu() for v in views], path)

    def step_generator(self) -> torch.Generator:
        """A generator seeded by (seed, step, rank): a resumed run draws the same views."""
        seed = self.config.seed * 1_000_003 + self.global_step * 7_919 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, features = self.pretext_loss(x, y, self.step_generator())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the {self.config.method} loss became {loss.item()} at step {self.global_step} "
                f"(epoch {self.current_epoch}); lower --lr or raise --temperature"
            )
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over processes
        total = loss
        labeled = y >= 0
        if self.probe is not None and labeled.sum() > 1:  # BatchNorm needs two samples
            logits = self.probe(features.detach()[labeled].float())
            probe_loss = F.cross_entropy(logits, y[labeled])
            accuracy = (logits.argmax(1) == y[labeled]).float().mean()
            self.log("train/probe_acc", accuracy, prog_bar=True)
            total = total + probe_loss
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return total

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        if self.probe is None or not (y >= 0).any():
            return
        logits = self.probe(self.encoder(x).float())[y >= 0]
        accuracy = (logits.argmax(1) == y[y >= 0]).float().mean()
        # The online probe's accuracy on the held-out split: a monitor, never used to select a
        # checkpoint or a setting (so the test split stays out of every choice).
        self.log("test/probe_acc", accuracy, prog_bar=True, batch_size=int((y >= 0).sum()))

    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(
            [m for name, m in self.named_children() if name != "probe"], self.config.weight_decay
        )
        if self.probe is not None:  # the probe learns on its own, without weight decay
            groups.append(
                {"params": list(self.probe.parameters()), "weight_decay": 0.0, "lars_exclude": True}
            )
        optimizer = build_optimizer(self.config.optimizer, groups, self.config.resolved_lr())
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total, round(self.config.warmup_epochs * steps_per_epoch))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(max(1, warmup), total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def run_config(self) -> dict[str, Any]:
        """What config.yaml holds: the user's options plus what was learned about the data."""
        return {**asdict(self.config), **self.data_info}
