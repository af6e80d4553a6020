"""Configuration dataclasses shared by the Python API and the CLI (same names, same defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from selfsup.errors import SelfsupError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its help text, and optionally `check`, the range its value must lie in
    (">0", ">=0", ">=N", "(0,1)", "[0,1)", "[0,1]"); None always passes."""
    return field(default=default, metadata={"help": help, **kw})


def _in_range(value: float, rule: str) -> bool:
    """Whether `value` satisfies `rule` (NaN satisfies none: every comparison is False)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low, high = (float(v) for v in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def check_fields(config: Any) -> None:
    """Raise a one-line SelfsupError for the first field outside its declared range or type."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        if tp in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SelfsupError(f"{flag} must be a number, got {value!r}")
        if tp is int and not isinstance(value, int):
            raise SelfsupError(f"{flag} must be a whole number, got {value!r}")
        rule = f.metadata.get("check")
        if rule and not _in_range(value, rule):
            expected = {
                ">0": "positive",
                ">=0": "zero or more",
                "(0,1)": "between 0 and 1 (exclusive)",
                "[0,1)": "at least 0 and below 1",
                "[0,1]": "between 0 and 1",
            }.get(rule, f"at least {rule[2:]}" if rule.startswith(">=") else rule)
            raise SelfsupError(f"{flag} must be {expected}, got {value}")


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; saved as `config.yaml` in the run directory."""

    method: str | None = _opt(
        None, "self-supervised method (default: simclr; with resume, the run's own)", cli=False
    )
    data: str = _opt(
        "digits", "dataset: digits | npz:DIR_OR_FILE | folder:PATH | cifar10 | mnist | ..."
    )
    data_dir: str | None = _opt(None, "root of torchvision datasets (default $SELFSUP_DATA)")
    download: bool = _opt(False, "download a torchvision dataset if it is missing")
    limit: int | None = _opt(
        None,
        "use a stratified first N training samples, and at most N test samples for the online "
        "probe (quick tries)",
        check=">=1",
    )
    image_size: int | None = _opt(
        None, "resize folder images to this size (default: first image)", check=">=1"
    )
    backbone: str | None = _opt(
        None,
        "encoder: convnet | convnet-wide | resnet18 | resnet50 | vit-mini | vit-tiny | vit-small "
        "| vit-base (default: the method's own, convnet; mae vit-mini)",
    )
    small_images: bool | None = _opt(
        None, "3x3 stem without max-pool for ResNets (default: on for images <= 64 px)"
    )
    recipe: str | None = _opt(
        None,
        "augmentation recipe of the views: simclr | digits | light | none | crop | flip | ... "
        "(default: the method's own: simclr; light for clip and colorization; none where the "
        "method draws no views)",
    )
    crop_size: int | None = _opt(
        None,
        "simclr/supcon: side of the square views in pixels (default: the image size)",
        check=">=4",
    )
    projection_dim: int = _opt(128, "output size of the projection head", check=">=1")
    projection_hidden: int = _opt(512, "hidden size of the projection head", check=">=1")
    temperature: float = _opt(0.5, "InfoNCE temperature", check=">0")
    code_dim: int = _opt(64, "autoencoder: size of the code (bottleneck)", check=">=1")
    linear_autoencoder: bool = _opt(
        False, "autoencoder: linear encoder and decoder on pixels (learns PCA's subspace)"
    )
    denoise: float = _opt(0.0, "autoencoder: std of Gaussian noise added to its input", check=">=0")
    # clip: image–caption data, the text transformer and its tokenizer
    templates: str | None = _opt(
        None, "clip: caption templates for labeled data, '|'-separated or a file (each with {})"
    )
    skip_bad: bool = _opt(
        False, "clip: skip (and count) caption rows with a missing image or an empty caption"
    )
    caption_holdout: float = _opt(
        0.2, "clip: the last fraction of caption-file images held out for retrieval", check="[0,1)"
    )
    text_tokenizer: str = _opt("bpe", "clip: caption tokenizer, bpe | char")
    text_vocab: int = _opt(1024, "clip: BPE vocabulary size (at least 259)", check=">=1")
    text_width: int = _opt(256, "clip: width of the text transformer", check=">=1")
    text_layers: int = _opt(4, "clip: layers of the text transformer", check=">=1")
    text_heads: int = _opt(4, "clip: attention heads of the text transformer", check=">=1")
    text_context: int = _opt(
        32, "clip: longest caption in tokens (longer ones are cut)", check=">=2"
    )
    text_pooling: str = _opt("eot", "clip: text vector: eot (causal, last token) | mean")
    # inpainting (context encoder): the removed region and the loss weights
    mask: str = _opt("center", "inpainting: region removed, center (one square) | random (blocks)")
    mask_size: int | None = _opt(
        None,
        "inpainting: side of each removed square (default: center H/2, random H/4)",
        check=">=1",
    )
    mask_blocks: int = _opt(
        4, "inpainting: squares removed per image with --mask random", check=">=1"
    )
    rec: float = _opt(0.999, "inpainting: weight of the L2 loss on the removed region")
    adv: float = _opt(0.001, "inpainting: weight of the adversarial loss (0: L2 only)")
    rec_outside: float = _opt(
        0.0, "inpainting: weight of the L2 loss outside the region, relative to inside"
    )
    # mae: the ViT (--backbone vit-mini | vit-tiny | vit-small | vit-base), masking, decoder
    patch_size: int = _opt(
        4, "mae: ViT patch side in pixels (must divide the image size)", check=">=1"
    )
    mask_ratio: float = _opt(
        0.75, "mae: fraction of patches hidden from the encoder", check="(0,1)"
    )
    norm_pix_loss: bool = _opt(True, "mae: normalise each target patch by its mean and std")
    decoder_dim: int = _opt(128, "mae: width of the light decoder")
    decoder_depth: int = _opt(2, "mae: transformer blocks of the decoder")
    # jigsaw: the tile grid, the random gaps between tiles and the permutation set
    jigsaw_grid: int = _opt(3, "jigsaw: tiles per side (3: a 3×3 puzzle)")
    jigsaw_jitter: int | None = _opt(
        None,
        "jigsaw: a tile is this many pixels smaller than its cell (default: 0.15 of the cell)",
    )
    jigsaw_permutations: int = _opt(
        100,
        "jigsaw: size of the permutation set (greedy maximal minimum Hamming distance)",
    )
    # colorization: L of Lab in, a distribution over quantised ab colours out
    ab_grid: float = _opt(
        10.0, "colorization: side of an ab colour bin (Zhang et al.: 10)", check=">0"
    )
    rebalance: float = _opt(
        0.5,
        "colorization: class rebalancing, mix of uniform in the prior (1: no rebalancing)",
        check="[0,1]",
    )
    epochs: int = _opt(10, "training epochs", check=">=1")
    batch_size: int = _opt(256, "images per batch (each gives two views)", check=">=1")
    optimizer: str = _opt("adamw", "sgd | lars | adamw")
    lr: float | None = _opt(
        None, "peak learning rate (default: adamw 1e-3, sgd 0.06*B/256, lars 0.3*B/256)", check=">0"
    )
    weight_decay: float = _opt(
        1e-4, "weight decay (not applied to biases and norm layers)", check=">=0"
    )
    warmup_epochs: float = _opt(
        1.0, "linear warm-up before the cosine decay, in epochs", check=">=0"
    )
    seed: int = _opt(0, "random seed (data order, augmentation, initialisation)")
    accelerator: str = _opt("auto", "cpu | gpu | auto (Lightning)")
    devices: str = _opt("auto", "number of devices or 'auto' (Lightning)")
    precision: str | None = _opt(None, "Lightning precision (default: bf16-mixed on GPU, else 32)")
    num_workers: int = _opt(
        0, "DataLoader workers (only needed for images decoded from disk)", check=">=0"
    )
    online_probe: bool = _opt(True, "train a linear probe on detached features when labels exist")
    sync_batchnorm: bool = _opt(
        False, "synchronise BatchNorm statistics across GPUs (SimCLR's global BN; CUDA only)"
    )
    progress: bool | None = _opt(
        None, "progress bars (default: on a terminal; otherwise one line per epoch)"
    )
    out: str | None = _opt(None, "run directory (default runs/METHOD-DATA-TIMESTAMP)")
    resume: str | None = _opt(None, "continue the run in this directory from its last checkpoint")

    def __post_init__(self) -> None:
        check_fields(self)

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
    limit: int | None = _opt(None, "use a stratified first N training samples", check=">=1")
    fractions: str = _opt("0.01,0.1,1.0", "label fractions for the few-label table")
    seeds: int = _opt(3, "label subsets (seeds) per fraction", check=">=1")
    baselines: str = _opt(
        "raw,pca,random,supervised", "comma list of raw, pca, random, supervised (or 'none')"
    )
    probe: str = _opt("linear", "classifier on frozen features: linear | knn")
    knn_k: int = _opt(20, "neighbours for the kNN classifier", check=">=1")
    finetune: str = _opt("none", "also fine-tune the encoder: none | all | last-K")
    supervised_steps: int = _opt(
        300, "optimisation steps of fine-tuning and the supervised baseline", check=">=1"
    )
    augment: str = _opt("light", "augmentation recipe for fine-tuning and the supervised baseline")
    kmeans: bool = _opt(True, "report k-means clustering (NMI, accuracy) of the embeddings")
    batch_size: int = _opt(256, "batch size for features and fine-tuning", check=">=1")
    device: str = _opt("auto", "cpu | cuda | auto")

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


# The sections a run's config.yaml adds to the options (what was learned about the data).
RUN_SECTIONS = ("dataset", "encoder", "text", "captions")


def read_config_file(path: str, cls: type) -> dict[str, Any]:
    """Options of `cls` from a YAML file, with their types; one line for anything wrong.

    A run's own config.yaml is accepted as it is: its data sections, its run folder (`out`) and
    `resume` are skipped, so giving it back starts a new run with the same options.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise SelfsupError(f"--config {path}: cannot read it ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SelfsupError(f"--config {path}: not valid YAML ({type(e).__name__})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SelfsupError(f"--config {path}: expected a mapping of option: value")
    is_run = "encoder" in values
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    options: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in RUN_SECTIONS or (is_run and name in ("out", "resume")):
            continue
        if name not in fields:
            raise SelfsupError(f"--config {path}: {key!r} is not an option of this command")
        tp = _base_type(hints[name])
        if value is not None and tp is str and not isinstance(value, str):
            value = str(value)  # `devices: 2` in YAML is the string option "2"
        if (
            value is not None
            and tp is float
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            value = float(value)
        if value is not None and not isinstance(value, tp if tp is not float else (float, int)):
            raise SelfsupError(f"--config {path}: {key} must be {tp.__name__}, got {value!r}")
        options[name] = value
    return options


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
