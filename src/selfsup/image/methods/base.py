"""The machinery every method shares: encoder, views, optimizer, schedule, online linear probe.

A method only says how a batch of uint8 images becomes a loss (`pretext_loss`); the rest --
devices, precision, checkpoints, resume, logging, progress bars -- comes from Lightning.
`--accumulate K` splits every batch into K micro-batches before one optimiser step (the
method's own loop, Lightning's manual optimisation): methods whose loss couples the images of a
batch (in-batch negatives) declare `grad_cache` and split `pretext_loss` into `cache_inputs`,
`embed` and `batch_loss`, so that the engine's gradient caching makes K micro-batches exactly one
batch; the others add up the gradients of their micro-batches.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.core.errors import NonFiniteLossError, SelfsupError
from selfsup.engine.accumulate import average_gradients, cached_backward
from selfsup.engine.optim import build_optimizer, parameter_groups, warmup_cosine
from selfsup.image.augment import build_recipe
from selfsup.image.config import PretrainConfig
from selfsup.image.data import ImageData, load_splits
from selfsup.image.models import Encoder
from selfsup.image.models.init_weights import load_init_weights, load_pretrained


@dataclass
class NoOptions:
    """A method without options of its own."""


def source_options(config: PretrainConfig) -> dict[str, Any]:
    """The options every image source takes beside --data (a method's `load_data` passes them
    on)."""
    keys = ("data_dir", "download", "limit", "image_size")
    return {k: getattr(config, k) for k in keys}


class Method(L.LightningModule):
    """Base class: subclasses set up their heads (in `build_heads` or `__init__`) and implement
    `pretext_loss`; selfsup.image.methods.siamese holds the pieces of the two-view methods.

    A method declares what is its own, in its file: `Options` (a dataclass of its options, shown
    by `selfsup pretrain METHOD --help`), `default_recipe` (None: it draws no augmented views,
    so `--recipe` does not apply) and `default_backbone`, which fill what a user left unset.
    Hooks with defaults: `load_data` (what --data means for it), `encoder_spec` (the encoder
    it trains), `view_size`, `build_heads`.
    """

    Options: ClassVar[type] = NoOptions
    default_recipe: ClassVar[str | None] = "simclr"
    default_backbone: ClassVar[str] = "convnet"
    # The smallest image and view side the method learns from. Below 4 px the ConvNet's first
    # 2×2 pool is skipped and a 3×3 convolution sees little more than one pixel's colour: an
    # encoder of 1×1 images trains without error and learns nothing spatial.
    min_image_side: ClassVar[int] = 4
    # The loss couples the images of a batch (in-batch negatives): with --accumulate, gradient
    # caching over `cache_inputs`, `embed` and `batch_loss` instead of adding micro-batches up.
    grad_cache: ClassVar[bool] = False

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

    @classmethod
    def load_data(
        cls, config: PretrainConfig, options: Any
    ) -> tuple[ImageData, ImageData | None, dict[str, Any]]:
        """(train, test, extra keyword arguments of the method) for `config.data`."""
        train, test = load_splits(config.data, seed=config.seed, **source_options(config))
        return train, test, {}

    @classmethod
    def encoder_spec(cls, config: PretrainConfig, options: Any, data: ImageData) -> dict[str, Any]:
        """Changes to the encoder `config.backbone` describes (e.g. a linear encoder)."""
        return {}

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The side of the views the recipe draws (the images' own by default)."""
        return image_size

    def check_image_size(self, image_size: tuple[int, int], view_size: tuple[int, int]) -> None:
        """A one-line error for images or views smaller than `min_image_side` pixels."""
        m = self.min_image_side
        if min(*image_size, *view_size) < m:
            (h, w), (vh, vw) = image_size, view_size
            views = f" (views {vh}×{vw})" if (vh, vw) != (h, w) else ""
            raise SelfsupError(
                f"--data {self.config.data}: {h}×{w}-pixel images{views} are too small for "
                f"{self.config.method or type(self).__name__}, which needs at least {m}×{m} "
                f"pixels (--image-size {m} or more enlarges them)"
            )

    @classmethod
    def create(cls, data_info: dict[str, Any], **options: Any) -> Method:
        """The method from option names as `selfsup.pretrain` takes them, shared or its own
        (for tests and notebooks): `MAE.create(info, patch_size=8, backbone="vit-tiny")`."""
        from selfsup.core.registry import build_options
        from selfsup.image.config import split_options

        shared, own = split_options(options)
        config = PretrainConfig(**shared)
        return cls(
            config, data_info, build_options(config.method or cls.__name__, own, cls.Options)
        )

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Any = None
    ) -> None:
        super().__init__()
        config = self.with_defaults(config)
        self.config = config
        self.options = options if options is not None else self.Options()
        self.data_info = data_info
        dataset = data_info["dataset"]
        view_size = self.view_size(tuple(dataset["image_size"]))  # may refuse the options
        self.check_image_size(tuple(dataset["image_size"]), view_size)
        self.encoder = Encoder(**data_info["encoder"])
        if config.init_weights:  # before the heads: momentum copies start from them too
            load_init_weights(
                self.encoder.backbone,
                config.init_weights,
                partial=config.init_weights_partial,
                what=f"--backbone {self.encoder.config['backbone']}",
            )
        elif config.pretrained:
            load_pretrained(self.encoder.backbone, what=f"--backbone {config.backbone}")
        self.encoder.use_channels_last()
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
        self.build_heads()
        # --accumulate: the micro-batches and the optimiser step in `accumulated_step`
        self.automatic_optimization = config.accumulate == 1

    def build_heads(self) -> None:
        """The method's modules beside the encoder (projector, predictor, ...), built last."""

    def two_views(self, x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(two views of each image of x as one batch, view 1 of every image first; their
        encoder features)."""
        views = torch.cat([self.views(x, g), self.views(x, g)])
        return views, self.encoder(views)

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(loss, encoder features of x or of one view of it, for the online probe).

        x: uint8 B×C×H×W; y: int64 B, -1 where unlabeled (only label-using methods read it);
        g: the step's generator (draw all randomness from it so resumed runs match).
        A `grad_cache` method leaves it to the default, its three parts in turn.
        """
        features, *embeddings = self.embed(*self.cache_inputs(x, y, g))
        return self.batch_loss(y, *embeddings), features

    def cache_inputs(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, ...]:
        """(`grad_cache`) The batch's inputs, every random draw made (once, for the whole
        batch): tensors whose first dimension is the image."""
        raise NotImplementedError

    def embed(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """(`grad_cache`) (encoder features for the probe, embeddings...) of some images'
        `cache_inputs`, one row per image; no randomness but dropout (replayed)."""
        raise NotImplementedError

    def batch_loss(self, y: Tensor, *embeddings: Tensor) -> Tensor:
        """(`grad_cache`) The loss of the whole batch's embeddings."""
        raise NotImplementedError

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Draw what the method does to the uint8 images `x` (views, reconstructions, ...)."""
        from selfsup.image.augment.preview import view_grid

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
        if not self.automatic_optimization:
            return self.accumulated_step(x, y)
        loss, features = self.pretext_loss(x, y, self.step_generator())
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over processes
        probe_loss = self.probe_loss(features, y)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss if probe_loss is None else loss + probe_loss

    def check_finite(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the {self.config.method} loss became {loss.item()} at step {self.global_step} "
                f"(epoch {self.current_epoch}); lower --lr"
            )

    def probe_loss(self, features: Tensor, y: Tensor) -> Tensor | None:
        """The online probe's loss on the detached features of the labeled images (logged with
        its accuracy); None without a probe or with fewer than two labels."""
        labeled = y >= 0
        if self.probe is None or labeled.sum() <= 1:  # BatchNorm needs two samples
            return None
        dtype = next(self.probe.parameters()).dtype  # float32 under bf16 autocast
        logits = self.probe(features.detach()[labeled].to(dtype))
        accuracy = (logits.argmax(1) == y[labeled]).float().mean()
        self.log("train/probe_acc", accuracy, prog_bar=True)
        return F.cross_entropy(logits, y[labeled])

    def accumulated_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimiser step over `--accumulate` K micro-batches of the batch (x, y): gradient
        caching for `grad_cache` methods, else the mean of the micro-batches' gradients (each
        micro-batch's BatchNorm statistics its own). Momentum updates, the schedule and the step
        counter move once, after it (`on_train_batch_end` runs once per batch)."""
        k, g = self.config.accumulate, self.step_generator()
        model = self.trainer.strategy.model
        with model.no_sync() if hasattr(model, "no_sync") else nullcontext():  # synced below
            if self.grad_cache:
                scaler = getattr(self.trainer.precision_plugin, "scaler", None)
                inputs = [t.tensor_split(k) for t in self.cache_inputs(x, y, g)]
                chunks = list(zip(*inputs, strict=True))
                loss, (features, *_) = cached_backward(
                    self,
                    self.embed,
                    lambda _features, *e: self.batch_loss(y, *e),
                    chunks,
                    self.manual_backward,
                    scaler.get_scale() if scaler is not None else 1.0,
                )
                self.check_finite(loss)
                if (probe_loss := self.probe_loss(features, y)) is not None:
                    self.manual_backward(probe_loss)
            else:
                losses = []
                for xk, yk in zip(x.tensor_split(k), y.tensor_split(k), strict=True):
                    part, features = self.pretext_loss(xk, yk, g)  # g draws on, chunk by chunk
                    self.check_finite(part)
                    probe_loss = self.probe_loss(features, yk)
                    self.manual_backward((part if probe_loss is None else part + probe_loss) / k)
                    losses.append(part.detach())
                loss = torch.stack(losses).mean()
        average_gradients([p for p in self.parameters() if p.requires_grad])
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()  # type: ignore[union-attr]
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

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
        """What config.yaml holds, flat: the shared options, the method's own, and what was
        learned about the data."""
        shared = {k: v for k, v in asdict(self.config).items() if k != "options"}
        return {**shared, **asdict(self.options), **self.data_info}
