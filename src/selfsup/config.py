"""Configuration dataclasses shared by the Python API and the CLI (same names, same defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from selfsup.errors import SelfsupError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; saved as `config.yaml` in the run directory."""

    method: str = _opt("simclr", "self-supervised method", cli=False)
    data: str = _opt(
        "digits", "dataset: digits | npz:DIR_OR_FILE | folder:PATH | cifar10 | mnist | ..."
    )
    data_dir: str | None = _opt(None, "root of torchvision datasets (default $SELFSUP_DATA)")
    download: bool = _opt(False, "download a torchvision dataset if it is missing")
    limit: int | None = _opt(None, "use a stratified first N training samples (quick tries)")
    image_size: int | None = _opt(None, "resize folder images to this size (default: first image)")
    backbone: str = _opt("convnet", "encoder: convnet | resnet18 | resnet50")
    small_images: bool | None = _opt(
        None, "3x3 stem without max-pool for ResNets (default: on for images <= 64 px)"
    )
    recipe: str = _opt("simclr", "augmentation recipe for the two views")
    projection_dim: int = _opt(128, "output size of the projection head")
    projection_hidden: int = _opt(512, "hidden size of the projection head")
    temperature: float = _opt(0.5, "InfoNCE temperature")
    code_dim: int = _opt(64, "autoencoder: size of the code (bottleneck)")
    linear_autoencoder: bool = _opt(
        False, "autoencoder: linear encoder and decoder on pixels (learns PCA's subspace)"
    )
    denoise: float = _opt(0.0, "autoencoder: std of Gaussian noise added to its input")
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(256, "images per batch (each gives two views)")
    optimizer: str = _opt("adamw", "sgd | lars | adamw")
    lr: float | None = _opt(
        None, "peak learning rate (default: adamw 1e-3, sgd 0.06*B/256, lars 0.3*B/256)"
    )
    weight_decay: float = _opt(1e-4, "weight decay (not applied to biases and norm layers)")
    warmup_epochs: float = _opt(1.0, "linear warm-up before the cosine decay, in epochs")
    seed: int = _opt(0, "random seed (data order, augmentation, initialisation)")
    accelerator: str = _opt("auto", "cpu | gpu | auto (Lightning)")
    devices: str = _opt("auto", "number of devices or 'auto' (Lightning)")
    precision: str | None = _opt(None, "Lightning precision (default: bf16-mixed on GPU, else 32)")
    num_workers: int = _opt(0, "DataLoader workers (only needed for images decoded from disk)")
    online_probe: bool = _opt(True, "train a linear probe on detached features when labels exist")
    out: str | None = _opt(None, "run directory (default runs/METHOD-DATA-TIMESTAMP)")
    resume: str | None = _opt(None, "continue the run in this directory from its last checkpoint")

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        scale = self.batch_size / 256
        return {"adamw": 1e-3, "sgd": 0.06 * scale, "lars": 0.3 * scale}[self.optimizer]


@dataclass
class EvalConfig:
    """What `selfsup evaluate` measures; results go to RUN/eval/<data>/."""

    data: str | None = _opt(None, "dataset to evaluate on (default: the run's own)")
    data_dir: str | None = _opt(None, "root of torchvision datasets (default $SELFSUP_DATA)")
    download: bool = _opt(False, "download a torchvision dataset if it is missing")
    limit: int | None = _opt(None, "use a stratified first N training samples")
    fractions: str = _opt("0.01,0.1,1.0", "label fractions for the few-label table")
    seeds: int = _opt(3, "label subsets (seeds) per fraction")
    baselines: str = _opt(
        "raw,pca,random,supervised", "comma list of raw, pca, random, supervised (or 'none')"
    )
    probe: str = _opt("linear", "classifier on frozen features: linear | knn")
    knn_k: int = _opt(20, "neighbours for the kNN classifier")
    finetune: str = _opt("none", "also fine-tune the encoder: none | all | last-K")
    supervised_steps: int = _opt(
        300, "optimisation steps of fine-tuning and the supervised baseline"
    )
    augment: str = _opt("light", "augmentation recipe for fine-tuning and the supervised baseline")
    kmeans: bool = _opt(True, "report k-means clustering (NMI, accuracy) of the embeddings")
    batch_size: int = _opt(256, "batch size for features and fine-tuning")
    device: str = _opt("auto", "cpu | cuda | auto")

    def fraction_list(self) -> tuple[float, ...]:
        try:
            return tuple(float(f) for f in self.fractions.split(",") if f.strip())
        except ValueError:
            raise SelfsupError(
                f"--fractions {self.fractions!r}: expected comma-separated numbers like 0.01,0.1,1"
            ) from None

    def baseline_list(self) -> tuple[str, ...]:
        names = tuple(b.strip() for b in self.baselines.split(",") if b.strip())
        return () if names == ("none",) else names


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; plain types pass through."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Mirror a config dataclass as `--field-name` options (bools become --x/--no-x)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if tp is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=f.default, help=help_text)


def from_namespace(cls: type, ns: argparse.Namespace, **extra: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    return cls(**{**values, **extra})
