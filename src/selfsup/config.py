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
    backbone: str = _opt("convnet", "encoder: convnet | convnet-wide | resnet18 | resnet50")
    small_images: bool | None = _opt(
        None, "3x3 stem without max-pool for ResNets (default: on for images <= 64 px)"
    )
    recipe: str = _opt("simclr", "augmentation recipe for the two views")
    crop_size: int | None = _opt(
        None, "simclr/supcon: side of the square views in pixels (default: the image size)"
    )
    projection_dim: int = _opt(128, "output size of the projection head")
    projection_hidden: int = _opt(512, "hidden size of the projection head")
    temperature: float = _opt(0.5, "InfoNCE temperature")
    code_dim: int = _opt(64, "autoencoder: size of the code (bottleneck)")
    linear_autoencoder: bool = _opt(
        False, "autoencoder: linear encoder and decoder on pixels (learns PCA's subspace)"
    )
    denoise: float = _opt(0.0, "autoencoder: std of Gaussian noise added to its input")
    # clip: image–caption data, the text transformer and its tokenizer
    templates: str | None = _opt(
        None, "clip: caption templates for labeled data, '|'-separated or a file (each with {})"
    )
    skip_bad: bool = _opt(
        False, "clip: skip (and count) caption rows with a missing image or an empty caption"
    )
    caption_holdout: float = _opt(
        0.2, "clip: the last fraction of caption-file images held out for retrieval"
    )
    text_tokenizer: str = _opt("bpe", "clip: caption tokenizer, bpe | char")
    text_vocab: int = _opt(1024, "clip: BPE vocabulary size (at least 259)")
    text_width: int = _opt(256, "clip: width of the text transformer")
    text_layers: int = _opt(4, "clip: layers of the text transformer")
    text_heads: int = _opt(4, "clip: attention heads of the text transformer")
    text_context: int = _opt(32, "clip: longest caption in tokens (longer ones are cut)")
    text_pooling: str = _opt("eot", "clip: text vector: eot (causal, last token) | mean")
    # inpainting (context encoder): the removed region and the loss weights
    mask: str = _opt("center", "inpainting: region removed, center (one square) | random (blocks)")
    mask_size: int | None = _opt(
        None, "inpainting: side of each removed square (default: center H/2, random H/4)"
    )
    mask_blocks: int = _opt(4, "inpainting: squares removed per image with --mask random")
    rec: float = _opt(0.999, "inpainting: weight of the L2 loss on the removed region")
    adv: float = _opt(0.001, "inpainting: weight of the adversarial loss (0: L2 only)")
    rec_outside: float = _opt(
        0.0, "inpainting: weight of the L2 loss outside the region, relative to inside"
    )
    # mae: the ViT (--backbone vit-mini | vit-tiny | vit-small | vit-base), masking, decoder
    patch_size: int = _opt(4, "mae: ViT patch side in pixels (must divide the image size)")
    mask_ratio: float = _opt(0.75, "mae: fraction of patches hidden from the encoder")
    norm_pix_loss: bool = _opt(True, "mae: normalise each target patch by its mean and std")
    decoder_dim: int = _opt(128, "mae: width of the light decoder")
    decoder_depth: int = _opt(2, "mae: transformer blocks of the decoder")
    # jigsaw: the tile grid, the random gaps between tiles and the permutation set
    jigsaw_grid: int = _opt(3, "jigsaw: tiles per side (3: a 3×3 puzzle)")
    jigsaw_jitter: int | None = _opt(
        None, "jigsaw: a tile is this many pixels smaller than its cell (default: 0.15 of the cell)"
    )
    jigsaw_permutations: int = _opt(
        100, "jigsaw: size of the permutation set (greedy maximal minimum Hamming distance)"
    )
    # colorization: L of Lab in, a distribution over quantised ab colours out
    ab_grid: float = _opt(10.0, "colorization: side of an ab colour bin (Zhang et al.: 10)")
    rebalance: float = _opt(
        0.5, "colorization: class rebalancing, mix of uniform in the prior (1: no rebalancing)"
    )
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
    probe_c: float | None = _opt(
        None, "fixed C of the linear probe (default: k-fold cross-validation per labeled subset)"
    )
    cv_folds: int = _opt(5, "folds of the cross-validation choosing the probe's C")
    supervised_epochs: int = _opt(
        30, "epochs of the supervised baseline over its labeled subset (early-stopped)"
    )
    supervised_max_steps: int | None = _opt(
        None, "upper bound on the supervised baseline's steps (--supervised-steps: --finetune only)"
    )
    supervised_augment: str | None = _opt(
        None, "augmentation of the supervised baseline (default: the run's pretraining recipe)"
    )
    cv_max_samples: int = _opt(
        10_000, "cross-validate the probe's C on at most this many labels of a subset (stratified)"
    )
    label_noise: str = _opt(
        "", "also probe with these fractions of the training labels flipped, e.g. 0.2,0.4"
    )

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
