"""The options an image run shares (PretrainConfig: data, views, engine, optimiser, run folder)
and what `selfsup evaluate` measures (EvalConfig), declared with `check=` ranges."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from selfsup.core.config import check_fields, option
from selfsup.core.errors import SelfsupError


@dataclass
class PretrainConfig:
    """What every pretraining run shares (data, views, engine, optimiser, run folder); each
    method adds its own `Options` (in its file) through `options`. Saved, flat, as the run's
    `config.yaml`."""

    method: str | None = option(
        None, "self-supervised method (default: simclr; with resume, the run's own)", cli=False
    )
    data: str = option(
        "digits", "dataset: digits | npz:DIR_OR_FILE | folder:PATH | cifar10 | mnist | ..."
    )
    data_dir: str | None = option(None, "root of torchvision datasets (default $SELFSUP_DATA)")
    download: bool = option(False, "download a torchvision dataset if it is missing")
    limit: int | None = option(
        None,
        "use a stratified first N training samples, and at most N test samples for the online "
        "probe (quick tries)",
        check=">=1",
    )
    image_size: int | None = option(
        None,
        "resize images to this square size (folders' default: the first image's short side, at "
        "most 224 px; on a CPU, 96 trains about 10x faster than 224)",
        check=">=1",
    )
    backbone: str | None = option(
        None,
        "encoder: convnet | convnet-wide | resnet18 | resnet50 | vit-mini | vit-tiny | vit-small "
        "| vit-base (default: the method's own, convnet; mae vit-mini); or any timm:NAME "
        "(pip install 'selfsup[timm]') or torchvision:NAME classification model, random "
        "weights, its own pooled features (mae takes timm ViTs only; colorization none)",
    )
    init_weights: str | None = option(
        None,
        "start the backbone from these weights: a timm or torchvision state dict (safetensors "
        "or a weights-only torch file) or a selfsup run's encoder.safetensors; a classifier "
        "head (fc., head., classifier.) is dropped, other missing or unexpected keys refused",
    )
    init_weights_partial: bool = option(
        False, "with --init-weights: load the keys that match, leave the rest as initialised"
    )
    pretrained: bool = option(
        False,
        "start a timm:NAME or torchvision:NAME backbone from the library's published weights "
        "(fetched once into its cache; needs internet; a tag picks them: timm:resnet50.a1_in1k, "
        "torchvision:resnet50.IMAGENET1K_V2; default the library's own); offline, pass the "
        "file with --init-weights",
    )
    small_images: bool | None = option(
        None, "3x3 stem without max-pool for ResNets (default: on for images <= 64 px)"
    )
    recipe: str | None = option(
        None,
        "augmentation recipe of the views: simclr | digits | light | none | crop | flip | ... "
        "(default: the method's own: simclr; light for clip and colorization; none where the "
        "method draws no views); images with other than 1 or 3 channels skip color-jitter, "
        "color-drop and sobel (crop, flip, rotation, cutout, noise, blur apply to any)",
    )
    epochs: int = option(10, "training epochs", check=">=1")
    batch_size: int = option(
        256,
        "images per batch and process (each gives two views); with --accumulate K, per "
        "micro-batch: an optimiser step sees K x this many (as Lightning, solo-learn, lightly)",
        check=">=1",
    )
    accumulate: int = option(
        1,
        "micro-batches per optimiser step (gradient accumulation): less memory, the same "
        "step; in-batch negatives (simclr, supcon, clip, moco-v3) through gradient caching, "
        "exactly one batch of K x --batch-size; steps, schedules and checkpoints count "
        "optimiser steps",
        check=">=1",
    )
    optimizer: str = option("adamw", "sgd | lars | adamw")
    lr: float | None = option(
        None,
        "peak learning rate (default: adamw 1e-3, sgd 0.06*B/256, lars 0.3*B/256; B the "
        "images of one optimiser step in one process: --batch-size x --accumulate)",
        check=">0",
    )
    weight_decay: float = option(
        1e-4, "weight decay (not applied to biases and norm layers)", check=">=0"
    )
    warmup_epochs: float = option(
        1.0, "linear warm-up before the cosine decay, in epochs", check=">=0"
    )
    seed: int = option(0, "random seed (data order, augmentation, initialisation)", check="seed")
    accelerator: str = option("auto", "cpu | gpu | auto (Lightning)")
    devices: str = option("auto", "number of devices or 'auto' (Lightning)")
    precision: str | None = option(
        None, "Lightning precision (default: bf16-mixed on GPU, else 32)", check="precision"
    )
    num_workers: int | None = option(
        None,
        "DataLoader workers decoding images from disk (default: one per CPU core, at most 8; "
        "in-memory data needs none)",
        check=">=0",
    )
    online_probe: bool = option(True, "train a linear probe on detached features when labels exist")
    sync_batchnorm: bool = option(
        False, "synchronise BatchNorm statistics across GPUs (SimCLR's global BN; CUDA only)"
    )
    progress: bool | None = option(
        None, "progress bars (default: on a terminal; otherwise one line per epoch)"
    )
    out: str | None = option(None, "run directory (default runs/METHOD-DATA-TIMESTAMP)")
    resume: str | None = option(None, "continue the run in this directory from its last checkpoint")
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the method's own options by name (its Options dataclass)", "cli": False},
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        scale = self.batch_size * self.accumulate / 256  # the images of one optimiser step
        return {"adamw": 1e-3, "sgd": 0.06 * scale, "lars": 0.3 * scale}[self.optimizer]


def split_options(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PretrainConfig's fields, the rest: a method's own options) of options given by name."""
    shared = {f.name for f in dataclasses.fields(PretrainConfig)}
    return (
        {k: v for k, v in values.items() if k in shared},
        {k: v for k, v in values.items() if k not in shared},
    )


@dataclass
class EvalConfig:
    """What `selfsup evaluate` measures; results go to RUN/eval/<data>/."""

    data: str | None = option(None, "dataset to evaluate on (default: the run's own)")
    data_dir: str | None = option(None, "root of torchvision datasets (default $SELFSUP_DATA)")
    download: bool = option(False, "download a torchvision dataset if it is missing")
    limit: int | None = option(
        None,
        "use a stratified first N training and at most N test samples (default: on the run's "
        "own data, the run's own --limit)",
        check=">=1",
    )
    fractions: str = option("0.01,0.1,1.0", "label fractions for the few-label table")
    seeds: int = option(3, "label subsets (seeds) per fraction", check=">=1")
    baselines: str = option(
        "raw,pca,random",
        "comma list of raw, pca, random, supervised (or 'none'); supervised trains one network "
        "per label subset (minutes to hours on a CPU; its estimated cost is printed first)",
    )
    probe: str = option("linear", "classifier on frozen features: linear | knn")
    knn_k: int = option(20, "neighbours for the kNN classifier", check=">=1")
    finetune: str = option("none", "also fine-tune the encoder: none | all | last-K")
    supervised_steps: int = option(
        300,
        "optimisation steps of --finetune (the supervised baseline has its own rule)",
        check=">=1",
    )
    augment: str = option(
        "light", "augmentation recipe for fine-tuning and the supervised baseline"
    )
    kmeans: bool = option(True, "report k-means clustering (NMI, accuracy) of the embeddings")
    batch_size: int = option(256, "batch size for features and fine-tuning", check=">=1")
    device: str = option("auto", "cpu | cuda | auto")
    probe_c: float | None = option(
        None, "fixed C of the linear probe (default: k-fold cross-validation per labeled subset)"
    )
    cv_folds: int = option(5, "folds of the cross-validation choosing the probe's C")
    supervised_epochs: int = option(
        30, "epochs of the supervised baseline over its labeled subset (early-stopped)"
    )
    supervised_max_steps: int | None = option(
        None, "upper bound on the supervised baseline's steps (--supervised-steps: --finetune only)"
    )
    supervised_augment: str | None = option(
        None, "augmentation of the supervised baseline (default: the run's pretraining recipe)"
    )
    cv_max_samples: int = option(
        10_000, "cross-validate the probe's C on at most this many labels of a subset (stratified)"
    )
    label_noise: str = option(
        "", "also probe with these fractions of the training labels flipped, e.g. 0.2,0.4"
    )
    shift: str = option(
        "",
        "also test under corruptions at 3 severities: 'all' or some of gaussian-noise, blur, "
        "contrast, jpeg, brightness (a probe trained on clean labels; beside raw and random)",
    )

    def __post_init__(self) -> None:
        check_fields(self)

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
