"""`--init-weights FILE`: a backbone's starting weights from a timm or torchvision state dict
(safetensors, or a weights-only torch file), a Hugging Face vision transformer's safetensors
(ViT, DINOv2) or another selfsup run's encoder.safetensors; `--pretrained`: the library's own.

Keys are mapped by the prefix that fits the backbone best: a raw timm/torchvision state dict
has none (selfsup's timm:/torchvision: backbones hold it as `model.`), a selfsup encoder's keys
start with `backbone.` (its `mean`/`std` are the data's and are not loaded: the new run has its
own). A classifier head the backbone lacks (`fc.`, `head.`, `classifier.`) is dropped. A
transformers ViT or DINOv2 file (told by its `embeddings.patch_embeddings` keys) is renamed to
timm's vision_transformer layout first (query/key/value fused into qkv), and a timm ViT gets
timm's own checkpoint filter (position table and patch embedding resampled to its sizes).

selfsup's own `vit-*` backbones share the patch embedding, pre-norm blocks and final norm of
that layout (renamed: `TIMM_TO_VIT`), but not its class token and learned position embeddings
(they use fixed 2-D sin-cos positions and mean-pool the tokens): a timm or transformers ViT
file carrying those is refused in one line (its features could not be reproduced), and with
`--init-weights-partial` loads everything but them.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from selfsup.core.errors import SelfsupError
from selfsup.image.models.external import (
    NOT_PUBLISHED,
    ExternalBackbone,
    fetch_pretrained,
    is_external,
)
from selfsup.image.models.vit import ViT

HEADS = ("fc", "head", "head_dist", "classifier", "pooler")
# prefixes a file's keys may carry beyond the backbone's own (selfsup encoder, DDP, wrappers)
PREFIXES = ("", "backbone.", "model.", "module.", "backbone.model.", "module.model.")
WRAPPERS = ("state_dict", "model", "module")  # checkpoints that nest the state dict
SHOWN = 8  # keys listed in an error line


def read_init_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of FILE (safetensors or a weights-only torch file), in one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SelfsupError(f"--init-weights {path}: no such file")
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header size, then JSON
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises several types for a damaged file
            raise SelfsupError(
                f"--init-weights {path}: not a readable safetensors file ({e})"
            ) from None
    else:
        state = _torch_weights(path)
    state = _unwrap(state)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise SelfsupError(
            f"--init-weights {path}: holds no state dict (names -> tensors); save "
            "model.state_dict() with torch.save or safetensors"
        )
    return state


def _torch_weights(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SelfsupError(
            f"--init-weights {path}: holds pickled objects beyond tensors, which selfsup never "
            "unpickles; save model.state_dict() (torch.save) or a safetensors file"
        ) from None
    except Exception as e:  # torch raises several types for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SelfsupError(
            f"--init-weights {path}: neither safetensors nor a torch file ({first})"
        ) from None


def _unwrap(state: object) -> object:
    """The state dict inside a checkpoint that nests it ({'state_dict': ...}, {'model': ...})."""
    while isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    return state


def load_init_weights(
    backbone: nn.Module, path: str | Path, *, partial: bool = False, what: str = "--backbone"
) -> None:
    """Load FILE into `backbone`: one line for missing or unexpected keys (unless `partial`)
    and for the first key whose shape differs."""
    load_state(backbone, read_init_weights(path), f"--init-weights {path}", partial, what)


def load_pretrained(backbone: nn.Module, *, what: str = "--backbone") -> None:
    """Load the library's published weights (`--pretrained`) into a timm/torchvision backbone."""
    state, source = fetch_pretrained(backbone)
    load_state(backbone, state, f"--pretrained ({source})", False, what)


def check_pretrained(backbone: str, init_weights: str | None) -> None:
    """One line unless `--pretrained` applies: a timm/torchvision backbone, no --init-weights."""
    if init_weights:
        raise SelfsupError(
            "--pretrained and --init-weights both choose the starting weights; pass one of them"
        )
    if not is_external(backbone):
        raise SelfsupError(NOT_PUBLISHED)


def load_state(
    backbone: nn.Module, state: dict[str, Tensor], source: str, partial: bool, what: str
) -> None:
    """Load `state` (keys mapped by `map_keys`) into `backbone`; `source` names it in errors."""
    state, names = map_keys(state, backbone)
    own = backbone.state_dict()
    extra = [k for k in VIT_ONLY_TIMM if k in state]
    if isinstance(backbone, ViT) and extra and not partial:
        raise SelfsupError(
            f"{source} is a ViT with a class token and learned position embeddings "
            f"({', '.join(names.get(k, k) for k in extra)}); {what} has neither (fixed sin-cos "
            "positions, mean-pooled tokens), so its features would differ: use a timm ViT "
            "(--backbone timm:vit_...) or --init-weights-partial to load the patch embedding, "
            "blocks and final norm alone"
        )
    missing = [k for k in own if k not in state]  # as the backbone names them
    unexpected = [names.get(k, k) for k in state if k not in own]  # as the file names them
    if (missing or unexpected) and not partial:
        listed = "; ".join(
            f"{label} {len(keys)}: {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise SelfsupError(
            f"{source} does not fit {what} ({listed}); pass --init-weights-partial to load the "
            "keys that match"
        )
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise SelfsupError(
                f"{source}: {key} has shape {tuple(value.shape)}, {what} needs "
                f"{tuple(own[key].shape)}"
            )
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# transformers' names (the Hub files', and transformers 5's own) -> timm's vision_transformer
# (DINOv2's original names for its mask and register tokens and SwiGLU, which timm's own
# checkpoint filter converts); attn.q/k/v and mlp.gate/up are fused below
HF_NAMES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.(?:attention\.)?(query|key|value|[qkv]_proj)\.", lambda m: f".attn.{m[1][0]}."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),
    (r"\.mlp\.(?:weights_out|down_proj)\.", ".mlp.w3."),
    (r"\.mlp\.(gate|up)_proj\.", r".mlp.\1."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
HF_MARK = "embeddings.patch_embeddings.projection.weight"
FUSED = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.w12": ("mlp.gate", "mlp.up")}


def hf_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ViT/DINOv2 state dict (any prefix before `embeddings.`, such as `vit.` or
    `dinov2.`) in timm's vision_transformer names; any other state dict unchanged."""
    prefix = next((k[: -len(HF_MARK)] for k in state if k.endswith(HF_MARK)), None)
    if prefix is None:
        return state
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(prefix)
        for pattern, replacement in HF_NAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = value
    for fused, pieces in FUSED.items():
        first = re.compile(rf"^(.*)\.{re.escape(pieces[0])}\.(weight|bias)$")
        for match in [m for m in map(first.match, list(out)) if m]:
            names = [f"{match[1]}.{piece}.{match[2]}" for piece in pieces]
            if all(n in out for n in names):
                out[f"{match[1]}.{fused}.{match[2]}"] = torch.cat([out.pop(n) for n in names])
    return out


# timm's vision_transformer names -> selfsup's ViT (torchvision EncoderBlocks); the fused qkv is
# nn.MultiheadAttention's in_proj (q, k, v in the same order)
TIMM_TO_VIT: list[tuple[str, str]] = [
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"\.norm1\.", ".ln_1."),
    (r"\.norm2\.", ".ln_2."),
    (r"\.attn\.qkv\.(weight|bias)$", r".self_attention.in_proj_\1"),
    (r"\.attn\.proj\.", ".self_attention.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
]
VIT_ONLY_TIMM = ("cls_token", "pos_embed")  # what selfsup's ViT has no place for


def timm_to_vit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A timm vision_transformer state dict in selfsup ViT names (others unchanged)."""
    if "patch_embed.proj.weight" not in state:
        return state
    out = {}
    for key, value in state.items():
        for pattern, replacement in TIMM_TO_VIT:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def map_keys(
    state: dict[str, Tensor], backbone: nn.Module
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(`state` with its keys named as `backbone`'s, each new name's name in the file): the
    prefix stripped (or added) that matches most of its keys; classifier-head keys the
    backbone lacks dropped."""
    converted = hf_to_timm(state)
    from_hf, state = converted is not state, converted
    if isinstance(backbone, ViT):
        state = timm_to_vit(state)
    own = set(backbone.state_dict())

    def renamed(strip: str, add: str) -> dict[str, str]:
        """New name -> the file's: keys under `strip` renamed, the others kept as they are
        (then unexpected), but a selfsup encoder's data statistics."""
        data_stats = ("mean", "std") if strip.startswith("backbone.") else ()
        return {
            add + k[len(strip) :] if k.startswith(strip) else k: k
            for k in state
            if k not in data_stats
        }

    options = [(s, a) for s in PREFIXES for a in ("", "model.")]
    names = max((renamed(s, a) for s, a in options), key=lambda d: len(own & d.keys()))
    kept = {
        k: state[old]
        for k, old in names.items()
        if k in own or k.removeprefix("model.").split(".")[0] not in HEADS
    }
    if _is_timm_vit(backbone):
        # positions resampled as the file's library does: transformers antialiases only
        # DINOv2 with registers' (timm always)
        antialias = not from_hf or any(k.endswith("register_tokens") for k in kept)
        kept = _timm_vit_filter(kept, backbone, antialias)  # type: ignore[arg-type]
    return kept, names


def _is_timm_vit(backbone: nn.Module) -> bool:
    """Whether `backbone` holds a timm VisionTransformer (its checkpoint filter applies)."""
    model = getattr(backbone, "model", None)
    kind = type(model)
    return (
        isinstance(backbone, ExternalBackbone)
        and kind.__name__ == "VisionTransformer"
        and kind.__module__.startswith("timm.")
    )


def _timm_vit_filter(
    state: dict[str, Tensor], backbone: ExternalBackbone, antialias: bool
) -> dict[str, Tensor]:
    """timm's own checkpoint filter for its ViTs over the `model.` keys: DINOv2's original
    names converted, the position table and patch embedding resampled to the model's sizes
    (bicubic; antialiased as timm does, or not, as transformers does)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    inner = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    rest = {k: v for k, v in state.items() if not k.startswith("model.")}
    model = backbone.model
    filtered = checkpoint_filter_fn(inner, model, antialias=antialias)  # type: ignore[arg-type]
    return {**{f"model.{k}": v for k, v in filtered.items()}, **rest}
