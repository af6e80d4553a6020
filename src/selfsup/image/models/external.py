"""Backbones from other libraries by name: `timm:NAME` (any timm model) and `torchvision:NAME`
(any torchvision classification model), randomly initialised, as feature extractors.

timm builds the model with `num_classes=0` (its own global pooling, no classifier) and reports
its width as `num_features`; torchvision's last linear layer (the classifier, with the dropout
just before it) becomes an identity and its input width is the feature width. Models that take
an image size (ViTs) are built for the run's; timm's plain ViTs also expose their patch tokens
(`TimmViT.embed`/`encode`), which MAE needs. A name may carry the published weights' tag
(`timm:resnet50.a1_in1k`, `torchvision:resnet50.IMAGENET1K_V2`), which `--pretrained` fetches.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.core.errors import SelfsupError
from selfsup.image.models.vit import check_patch_size

PREFIXES = ("timm:", "torchvision:")
# torchvision models whose training-mode output is not one tensor unless told so.
TORCHVISION_EXTRA: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


NOT_PUBLISHED = (
    "--pretrained needs --backbone timm:NAME or torchvision:NAME (selfsup's own backbones have "
    "no published weights; --init-weights FILE starts from a file)"
)


def is_external(name: str | None) -> bool:
    """Whether `name` names a timm or torchvision backbone (`timm:NAME`, `torchvision:NAME`)."""
    return name is not None and name.startswith(PREFIXES)


class ExternalBackbone(nn.Module):
    """A library's model as a backbone: normalised images B×C×H×W -> pooled features B×D."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        fixed_size: tuple[int, int] | None,
        built: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name, self.model, self.fixed_size = name, model, fixed_size
        self.built = built or {}  # the arguments the library built it with (--pretrained's)

    def forward(self, x: Tensor) -> Tensor:
        if self.fixed_size is not None and tuple(x.shape[-2:]) != self.fixed_size:
            (h, w), (gh, gw) = self.fixed_size, x.shape[-2:]
            raise SelfsupError(
                f"--backbone {self.name} was built for {h}×{w} images, got {gh}×{gw}: its "
                "position embeddings fix the input size (--crop-size and --local-crops need a "
                "backbone of any input size, such as a CNN)"
            )
        return self.model(x)

    def stages(self) -> list[nn.Module]:
        """The model's top-level modules with weights, sequences of blocks split into blocks."""
        parts: list[nn.Module] = []
        for child in self.model.children():
            blocks = child if isinstance(child, (nn.Sequential, nn.ModuleList)) else [child]
            parts += [b for b in blocks if any(True for _ in b.parameters())]
        return parts


class TimmViT(ExternalBackbone):
    """A timm VisionTransformer with its patch tokens exposed, as MAE uses selfsup's own ViT:
    `embed` (patch tokens plus positions), `encode` (class/register tokens, blocks, final norm,
    over any subset of the patch tokens; returns the patch tokens)."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        fixed_size: tuple[int, int],
        built: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name, model, fixed_size, built)
        p = model.patch_embed.patch_size  # type: ignore[union-attr]
        self.patch_size, self.dim = p[0], model.embed_dim
        self.grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr]
        # pos_embed holds the prefix tokens' positions first unless the model says otherwise
        self.prefix_positions = 0 if model.no_embed_class else model.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def embed(self, x: Tensor) -> Tensor:
        m = self.model
        return m.patch_embed(x) + m.pos_embed[:, self.prefix_positions :]

    def encode(self, tokens: Tensor) -> Tensor:
        m = self.model
        prefix = [
            t.expand(len(tokens), -1, -1) for t in (m.cls_token, m.reg_token) if t is not None
        ]
        if prefix:
            first = torch.cat(prefix, dim=1)
            if self.prefix_positions:
                first = first + m.pos_embed[:, : self.prefix_positions]
            tokens = torch.cat([first.to(tokens.dtype), tokens], dim=1)
        x = m.norm(m.blocks(m.norm_pre(m.pos_drop(tokens))))
        return x[:, m.num_prefix_tokens :]


def build_external(
    name: str,
    in_channels: int,
    image_size: list[int] | None = None,
    patch_size: int | None = None,
) -> tuple[ExternalBackbone, int]:
    """(backbone, feature width) of `timm:NAME` or `torchvision:NAME`, random weights; models
    that take an image size (ViTs) get `image_size`, timm ViTs also `patch_size` (MAE's)."""
    library, arch = resolve(name)
    if library == "timm":
        sizes = {"img_size": image_size, "patch_size": patch_size}
    else:  # torchvision's ViTs are square
        square = image_size is not None and image_size[0] == image_size[1]
        sizes = {"image_size": image_size[0] if square else None}  # type: ignore[index]
    build = _timm_model if library == "timm" else _torchvision_model
    sizes = {k: v for k, v in sizes.items() if v}
    try:
        model, width, used = build(arch, in_channels, sizes)
    except SelfsupError:
        raise
    except Exception as e:  # the library's own refusal (sizes, channels, ...) in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        size = f" for {image_size[0]}×{image_size[1]} images" if image_size else ""
        raise SelfsupError(
            f"--backbone {name}: {library} cannot build it{size} ({first})"
        ) from None
    fixed = tuple(image_size) if used and image_size else None
    built = {"in_channels": in_channels, **sizes}
    if library == "timm" and _has_patch_tokens(model) and image_size is not None:
        check_patch_size(image_size, model.patch_embed.patch_size[0])
        return TimmViT(name, model, fixed, built), width  # type: ignore[arg-type]
    return ExternalBackbone(name, model, fixed, built), width  # type: ignore[arg-type]


def resolve(name: str) -> tuple[str, str]:
    """(library, architecture) of `timm:NAME`/`torchvision:NAME`, checked: one line for a
    missing timm or an unknown name (with close matches). timm's names keep their weights' tag
    (timm takes it), torchvision's lose it (`weights_tag` reads it)."""
    library, _, arch = name.partition(":")
    if library == "torchvision":
        arch = arch.partition(".")[0]
    if library == "timm":
        timm = import_timm(name)
        known, listed = timm.is_model(arch), timm.list_models
    elif library == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        known, listed = arch in names, lambda: names
    else:
        raise SelfsupError(f"--backbone {name!r}: expected timm:NAME or torchvision:NAME")
    if not known:
        close = difflib.get_close_matches(arch, listed(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'{library}:{c}' for c in close)}?" if close else ""
        kind = "model" if library == "timm" else "classification model"
        raise SelfsupError(f"--backbone {name}: {library} has no {kind} {arch!r}{hint}")
    return library, arch


def weights_tag(name: str) -> str | None:
    """The published weights a torchvision name picks (`torchvision:resnet50.IMAGENET1K_V2`)."""
    return name.partition(":")[2].partition(".")[2] or None


def import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError:
        raise SelfsupError(f"--backbone {name} needs timm: pip install 'selfsup[timm]'") from None
    return timm


def _with_sizes(create: Callable[..., nn.Module], sizes: dict[str, Any]) -> tuple[nn.Module, bool]:
    """(model, whether it took an image size): each size argument the model refuses (a CNN
    takes none) is dropped from `sizes`."""
    while True:
        try:
            return create(**sizes), bool(sizes.keys() & {"img_size", "image_size"})
        except TypeError as e:
            refused = [k for k in sizes if repr(k) in str(e)]
            if not refused:
                raise
            del sizes[refused[0]]


def _timm_model(arch: str, in_channels: int, sizes: dict) -> tuple[nn.Module, int, bool]:
    import timm

    def create(**kw: Any) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels, **kw)

    model, used = _with_sizes(create, sizes)
    return model, int(model.num_features), used


def _torchvision_model(arch: str, in_channels: int, sizes: dict) -> tuple[nn.Module, int, bool]:
    from torchvision.models import get_model

    extra = TORCHVISION_EXTRA.get(arch, {})
    model, used = _with_sizes(lambda **kw: get_model(arch, weights=None, **extra, **kw), sizes)
    width = _drop_classifier(model, arch)
    if in_channels != 3:
        _set_input_channels(model, in_channels, arch)
    return model, width, used


def fetch_pretrained(backbone: nn.Module) -> tuple[dict[str, Tensor], str]:
    """(the library's published weights for a `timm:`/`torchvision:` backbone, as a state dict
    of its model (timm's adapted to its channels and sizes, torchvision's with the classifier);
    where they come from). Downloaded once into the library's own cache; one line naming what
    could not be fetched, and how to pass a local file instead, when that fails (offline)."""
    if not isinstance(backbone, ExternalBackbone):
        raise SelfsupError(NOT_PUBLISHED)
    library, arch = resolve(backbone.name)
    built = dict(backbone.built)
    channels = built.pop("in_channels", 3)
    fetch, source = (_timm_weights if library == "timm" else _torchvision_weights)(
        backbone.name, arch, channels, built
    )
    try:
        state = fetch()
    except OSError as e:  # no network, HF_HUB_OFFLINE, a failed download: all OSErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise SelfsupError(
            f"--pretrained: could not fetch {library}'s weights for {arch} from {source}"
            f"{offline}: {first}; download the file where there is internet and pass it with "
            "--init-weights FILE instead (the state dict as safetensors or a torch file)"
        ) from None
    if library == "torchvision" and channels != 3:
        _adapt_first_conv(state, backbone.model, channels)
    return state, source


def _timm_weights(
    name: str, arch: str, channels: int, built: dict[str, Any]
) -> tuple[Callable[[], dict[str, Tensor]], str]:
    """(a call that builds the timm model with its published weights, adapted to `channels`
    and the image and patch size it was built for, and returns its state; their source)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    source = cfg and (cfg.hf_hub_id and f"hf-hub:{cfg.hf_hub_id}" or cfg.url or cfg.file)
    if not source:
        raise SelfsupError(f"--pretrained: timm publishes no weights for {arch}")

    def fetch() -> dict[str, Tensor]:
        kw = dict(pretrained=True, num_classes=0, in_chans=channels, **built)
        return timm.create_model(arch, **kw).state_dict()

    return fetch, source


def _torchvision_weights(
    name: str, arch: str, channels: int, built: dict[str, Any]
) -> tuple[Callable[[], dict[str, Tensor]], str]:
    """(a call that downloads torchvision's weights named by the tag, DEFAULT without one;
    their URL)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch)
    tag = weights_tag(name) or "DEFAULT"
    if tag not in weights.__members__:
        known = ", ".join(weights.__members__)
        raise SelfsupError(
            f"--backbone {name}: torchvision's {arch} has no weights {tag!r}; expected one of "
            f"{known}"
        )
    chosen = weights[tag]
    return lambda: chosen.get_state_dict(progress=False), chosen.url


def _adapt_first_conv(state: dict[str, Tensor], model: nn.Module, channels: int) -> None:
    """RGB weights of the first convolution for `channels` inputs, as timm adapts them: summed
    for one channel, otherwise repeated and scaled by 3/channels."""
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    weight = state.get(f"{name}.weight")
    if weight is None or weight.shape[1] != 3:
        return
    if channels == 1:
        state[f"{name}.weight"] = weight.sum(dim=1, keepdim=True)
    else:
        repeated = weight.repeat(1, -(-channels // 3), 1, 1)[:, :channels]
        state[f"{name}.weight"] = repeated * (3 / channels)


def _drop_classifier(model: nn.Module, arch: str) -> int:
    """Replace the last linear layer (the classifier) and the dropout just before it by
    identities; returns its input width, the features'."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SelfsupError(f"--backbone torchvision:{arch}: no linear classifier to remove")
    parent_name, _, attr = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    width = getattr(parent, attr).in_features
    setattr(parent, attr, nn.Identity())
    if isinstance(parent, nn.Sequential):
        before = list(parent._modules)[: list(parent._modules).index(attr)]
        for key in reversed(before):
            if not isinstance(parent._modules[key], nn.Dropout):
                break
            parent._modules[key] = nn.Identity()
    return int(width)


def _set_input_channels(model: nn.Module, channels: int, arch: str) -> None:
    """Swap the first convolution for one of `channels` inputs (otherwise the same)."""
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if name is None:
        raise SelfsupError(f"--backbone torchvision:{arch}: takes 3-channel images only")
    old = model.get_submodule(name)
    new = nn.Conv2d(
        channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        old.stride,  # type: ignore[arg-type]
        old.padding,  # type: ignore[arg-type]
        old.dilation,  # type: ignore[arg-type]
        bias=old.bias is not None,
    )
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _has_patch_tokens(model: nn.Module) -> bool:
    """A timm VisionTransformer with a learned position table of fixed size (what MAE needs)."""
    from timm.models.vision_transformer import VisionTransformer

    return (
        isinstance(model, VisionTransformer)
        and model.pos_embed is not None
        and not model.dynamic_img_size
        and model.patch_embed.patch_size[0] == model.patch_embed.patch_size[1]
    )
