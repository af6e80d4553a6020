"""`LanguageModule`: what every kind of `selfsup lm pretrain KIND` trained by `pretrain_lm` is.

A kind is a subclass registered in `selfsup.lm.methods.PRETRAIN`. Its file declares its own
`Options` dataclass (fields made with `option(default, help, check=...)`) and, as literals on
the class (read from the source by `ast`, so that `--help` needs no torch), its `help` line,
its `defaults` of the shared LMConfig options and its `presets`. The class provides
`SPECIAL_TOKENS`, `build` and `load_init`; `selfsup.lm.training.pretrain` does the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor

from selfsup.core.errors import NonFiniteLossError
from selfsup.engine.optim import warmup_cosine
from selfsup.lm.options import LMConfig


class LanguageModule(L.LightningModule):
    """Shared machinery: AdamW with warm-up + cosine, logging, a NaN guard, validation.

    Subclasses implement `build`, `make_batch` and `loss`, and may override `load_init`,
    `check_data` and `export`.
    """

    Options: ClassVar[type]  # the kind's own options (the CLI reads them from the source)
    help: ClassVar[str]  # one line for `selfsup lm pretrain --help`
    defaults: ClassVar[dict[str, Any]] = {}  # the kind's own defaults of LMConfig's options
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # --preset NAME: settings over defaults
    SPECIAL_TOKENS: ClassVar[tuple[str, ...]] = ()  # what a tokenizer trained for it must hold

    def __init__(self, config: LMConfig, options: Any, vocab_size: int) -> None:
        super().__init__()
        self.config, self.options, self.vocab_size = config, options, vocab_size

    @classmethod
    def build(cls, config: LMConfig, options: Any, tokenizer: Any, init: Any) -> LanguageModule:
        """The module to train (`init`: what `load_init` read from --init, or None)."""
        raise NotImplementedError

    @staticmethod
    def load_init(path: str) -> Any:
        """The model of a local checkpoint given to --init (its `vocab_size` is checked)."""
        raise NotImplementedError

    def make_batch(self, ids: np.ndarray, rng: np.random.Generator, batch_size: int) -> Any:
        """One batch drawn from the token ids `ids` with `rng` (tensors on the CPU)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, extra metrics such as accuracies) of one batch."""
        raise NotImplementedError

    def check_data(self, train_ids: np.ndarray, val_ids: np.ndarray) -> None:
        """Raise SelfsupError when the token ids cannot make a batch (e.g. too short)."""

    def export(self, run: Path, tokenizer: Any) -> None:
        """Write the trained model's exports into the run directory."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, metrics = self.loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the {self.config.model} loss became {loss.item()} at step {self.global_step}; "
                "lower --lr"
            )
        self.log("train/loss", loss, prog_bar=True)
        for name, value in metrics.items():
            self.log(f"train/{name}", value)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, metrics = self.loss(batch)  # every process holds an equal share of the rows
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.config.lr,
            betas=(0.9, self.config.beta2),
            # One fused kernel for all parameters: 13% of the baby GPT's CPU step otherwise.
            fused=self.device.type in ("cpu", "cuda"),
        )
        factor = warmup_cosine(
            max(1, self.config.warmup_steps), self.config.steps, self.config.min_lr_fraction
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
