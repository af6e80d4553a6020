"""From a few labels to a classifier that labels the rest.

`classify(RUN, labels, out)`: the run's frozen encoder and a multinomial logistic regression on
its (standardised) features, C cross-validated on the labels when every class has two, saved as
ONE safetensors file (encoder, feature statistics, linear head; architecture and class names in
its metadata). `predict(CLASSIFIER, images, out)`: streams image files in batches (memory bounded
by the batch, whatever the folder's size) and writes path, label, confidence, one probability
per class, and a flag for low confidence.

Labels are a CSV with a header `path,label` (image files, relative to the CSV's folder) or
`index,label` (positions in the run's training images), or `folder:PATH` whose class
sub-folders name the labels.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from selfsup.core.errors import SelfsupError
from selfsup.image.data.decode import max_pixels

FORMAT = "selfsup-classifier-1"
LOW_CONFIDENCE = 0.5  # a prediction below this probability is flagged for a person to check


def read_labels(spec: str) -> tuple[list[str | int], list[str], Path | None]:
    """(ids: paths or indices, labels, the CSV's folder) from a CSV or `folder:PATH`."""
    if spec.startswith("folder:"):
        from selfsup.image.data.sources import scan_folder

        root = Path(spec[len("folder:") :]).expanduser()
        if not root.is_dir():
            raise SelfsupError(f"--labels {spec}: {root} is not a folder")
        paths, codes, classes = scan_folder(root, None)
        if codes is None:
            raise SelfsupError(f"--labels {spec}: no class sub-folders to take labels from")
        return [str(p) for p in paths], [classes[c] for c in codes], None  # type: ignore[index]
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SelfsupError(f"--labels {path}: cannot read it as text ({e})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:2]] not in (
        ["path", "label"],
        ["index", "label"],
    ):
        raise SelfsupError(f"{path}:1: expected the header path,label or index,label")
    by_index = rows[0][0].strip().lower() == "index"
    ids: list[str | int] = []
    labels: list[str] = []
    seen: dict[str | int, int] = {}
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[1].strip():
            raise SelfsupError(f"{path}:{number}: expected two values, an image and its label")
        key: str | int = row[0].strip()
        if by_index:
            try:
                key = int(key)
            except ValueError:
                raise SelfsupError(
                    f"{path}:{number}: index {key!r} is not a whole number"
                ) from None
            if key < 0:
                raise SelfsupError(
                    f"{path}:{number}: index {key} must be >= 0 (a position in the images, from 0)"
                )
        else:
            file = Path(key) if Path(key).is_absolute() else path.parent / key
            if not file.is_file():
                raise SelfsupError(f"{path}:{number}: image {key} does not exist")
            key = str(file)
        if key in seen:
            raise SelfsupError(f"{path}:{number}: {key} is listed twice (first on row {seen[key]})")
        seen[key] = number
        ids.append(key)
        labels.append(row[1].strip())
    if len(set(labels)) < 2:
        raise SelfsupError(
            f"{path}: needs labels of at least two classes, found {sorted(set(labels))}"
        )
    return ids, labels, path.parent


def file_images(paths: list[str], size: int) -> torch.utils.data.Dataset:
    """Image files as pretraining reads a folder of them: item i -> (C×size×size, 0), 8-bit
    files as uint8 RGB (`sources.FolderImages`), TIFF stacks and 16-bit PNGs with their own
    channels as float [0, 1] (`multichannel.StackImages`; the first file says which, another
    kind is one line naming it)."""
    from selfsup.image.data.multichannel import StackImages, is_stack
    from selfsup.image.data.sources import STACKS, FolderImages

    if is_stack(paths[0]):
        return StackImages(paths, [0] * len(paths), size)
    tiff = next((p for p in paths if Path(p).suffix.lower() in STACKS), None)
    if tiff is not None:
        raise SelfsupError(
            f"{tiff}: a TIFF (read as a channel stack) among 8-bit images such as {paths[0]}"
        )
    return FolderImages(paths, [0] * len(paths), size)


def load_image_files(paths: list[str], shape: tuple[int, int, int]) -> torch.Tensor:
    """N×C×H×W of image files at the encoder's channels and size (uint8, or float [0, 1] for
    16-bit and multichannel files: `file_images`)."""
    from selfsup.image.data.transforms import adapt_images

    channels, h, _ = shape
    files = file_images(paths, h)
    return adapt_images(torch.stack([files[i][0] for i in range(len(files))]), channels, (h, h))


def file_batches(
    paths: list[str], shape: tuple[int, int, int], batch_size: int, workers: int = 2
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(paths, images) in order, `batch_size` at a time, decoded by `workers` DataLoader
    processes while the encoder runs (in the main process for a single batch)."""
    from selfsup.image.data.transforms import adapt_images

    channels, h, _ = shape
    workers = workers if len(paths) > batch_size else 0
    files = file_images(paths, h)  # decoded and squared, as load_image_files
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers)
    for start, (x, _) in zip(range(0, len(paths), batch_size), loader, strict=True):
        yield paths[start : start + len(x)], adapt_images(x, channels, (h, h))


def classify(
    run: str | Path,
    labels: str,
    out: str | Path,
    *,
    data: str | None = None,
    device: str = "auto",
    finetune: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the classifier on the labeled images and save it to `out` (one file); with
    `finetune`, the encoder is trained too (see `finetune_head`)."""
    from selfsup.core import run as rundir
    from selfsup.engine.device import resolve_device
    from selfsup.image.runs import dataset_for, load

    ids, names, _ = read_labels(labels)
    encoder, device = load(run), resolve_device(device)
    config = rundir.read_config(run)
    shape = rundir.input_shape(config)
    if isinstance(ids[0], int):
        images = dataset_for(run, data)
        bad = next((i for i in ids if i >= len(images)), None)  # type: ignore[operator]
        if bad is not None:
            raise SelfsupError(f"--labels {labels}: index {bad} is past the {len(images)} images")
        x = images.images(torch.as_tensor(ids))
    else:
        x = load_image_files([str(i) for i in ids], shape)  # type: ignore[arg-type]
    classes = sorted(set(names))
    y = np.array([classes.index(n) for n in names])
    info: dict[str, Any] = {}
    if finetune:
        from selfsup.image.augment.recipes import RECIPES

        recipe = config.get("recipe") if config.get("recipe") in RECIPES else "light"
        model = finetune_head(encoder, x, y, recipe=recipe, seed=seed, device=device, info=info)
    else:
        model = probe_head(encoder, x, y, device)
    tensors = {
        f"encoder.{k}": v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()
    }
    tensors.update(
        {
            "feature.mean": model.mean.cpu(),
            "feature.std": model.std.cpu(),
            "head.weight": model.head.weight.detach().cpu().contiguous(),
            "head.bias": model.head.bias.detach().cpu().contiguous(),
        }
    )
    metadata = {
        "format": FORMAT,
        "selfsup_encoder": json.dumps(encoder.config),
        "classes": json.dumps(classes),
        "input_shape": json.dumps(list(shape)),
        "C": str(model.C),
        "finetuned": json.dumps(info),
        "run": str(run),
    }
    out = Path(out)
    rundir.atomic_save(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    with torch.inference_mode():
        predicted = model.to(device)(x.to(device)).argmax(1).cpu().numpy()
    return {
        "out": str(out),
        "classes": classes,
        "labels": len(y),
        "C": model.C,
        "train_accuracy": float(np.mean(predicted == y)),
        "finetune": info,
    }


class Head(torch.nn.Module):
    """Encoder, feature standardisation, linear head: uint8 images -> class logits."""

    def __init__(self, encoder: torch.nn.Module, probe: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", probe.mean.float())
        self.register_buffer("std", probe.std.float())
        w, b = probe.fit.weight.detach().float(), probe.fit.bias.detach().float()
        if w.shape[0] == 1:  # two classes: one logit against a fixed 0
            w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
        self.head = torch.nn.Linear(w.shape[1], w.shape[0])
        self.head.load_state_dict({"weight": w, "bias": b})
        self.C = float(probe.fit.C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.encoder(x).float() - self.mean) / self.std)


def probe_head(encoder: torch.nn.Module, x: torch.Tensor, y: np.ndarray, device: Any) -> Head:
    """The frozen encoder and a logistic regression (C cross-validated) on its features."""
    from selfsup.image.data import ImageData
    from selfsup.image.evaluation import extract_features
    from selfsup.image.evaluation.probes import fit_probe

    data = ImageData(x, None, None, "labels")
    features = extract_features(encoder, data, device=device, progress=False)
    return Head(encoder, fit_probe(features, y)).eval()


ENCODER_LR, HEAD_LR = 1e-4, 1e-3  # AdamW; the encoder moves 10x slower than the head
MAX_ROUNDS, PATIENCE, ROUND_STEPS, BATCH = 20, 3, 10, 64


def finetune_head(
    encoder: torch.nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    *,
    recipe: str,
    seed: int = 0,
    device: Any = "cpu",
    info: dict[str, Any] | None = None,
) -> Head:
    """Fine-tune the encoder and head from the linear probe's solution (LP-FT, Kumar et al.
    2022), with the run's augmentation, AdamW (ENCODER_LR for the encoder, HEAD_LR for the
    head) and the encoder's BatchNorm statistics frozen. How long: chosen on a stratified 20%
    of the labels held out (rounds of at least ROUND_STEPS steps, up to MAX_ROUNDS, stopped
    after PATIENCE rounds without a better held-out accuracy; round 0 is the probe itself);
    then the probe and the fine-tuning are redone on all the labels for that many rounds."""
    from selfsup.image.evaluation.few_label import _holdout

    held = _holdout(y, seed)
    rounds = 0
    if len(held):
        kept = np.setdiff1d(np.arange(len(y)), held)
        val = (x[torch.as_tensor(held)], y[held])
        rounds = _finetune(encoder, x[torch.as_tensor(kept)], y[kept], recipe, seed, device, val)[1]
    model = _finetune(encoder, x, y, recipe, seed, device, None, rounds)[0]
    if info is not None:
        info.update(rounds=rounds, held_out=len(held), recipe=recipe)
    return model


def _finetune(
    encoder: torch.nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    recipe: str,
    seed: int,
    device: Any,
    val: tuple[torch.Tensor, np.ndarray] | None,
    rounds: int = MAX_ROUNDS,
) -> tuple[Head, int]:
    """(model, best round): `rounds` rounds of fine-tuning, early-stopped on `val` if given."""
    import copy

    import torch.nn.functional as F

    from selfsup.image.augment import build_recipe

    model = probe_head(copy.deepcopy(encoder), x, y, device).to(device)
    if rounds == 0:
        return model, 0
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": ENCODER_LR},
            {"params": model.head.parameters(), "lr": HEAD_LR},
        ],
        weight_decay=1e-4,
    )
    aug = build_recipe(recipe, tuple(x.shape[-2:]), x.shape[1]).to(device)
    g, aug_g = torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed)
    targets = torch.as_tensor(y, device=device)
    steps = max(ROUND_STEPS, -(-len(y) // BATCH))

    def score() -> tuple[float, float]:  # held-out (accuracy, -loss): higher is better
        with torch.inference_mode():
            logits = model(val[0].to(device)).float()  # type: ignore[index]
            t = torch.as_tensor(val[1], device=device)  # type: ignore[index]
            return float((logits.argmax(1) == t).float().mean()), -float(F.cross_entropy(logits, t))

    best, best_round = (score() if val else None), 0
    best_state = copy.deepcopy(model.state_dict()) if val else None
    for r in range(1, rounds + 1):
        model.eval()  # BatchNorm statistics (and dropout) stay as pretrained
        for _ in range(steps):
            idx = torch.randint(len(y), (min(BATCH, len(y)),), generator=g)
            logits = model(aug(x[idx].to(device), aug_g))
            loss = F.cross_entropy(logits.float(), targets[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is not None:
            now = score()
            if now > best:  # type: ignore[operator]
                best, best_round, best_state = now, r, copy.deepcopy(model.state_dict())
            elif r - best_round >= PATIENCE:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), (best_round if val is not None else rounds)


class Classifier(torch.nn.Module):
    """A saved classifier: uint8 images N×C×H×W (the input shape) -> class probabilities."""

    def __init__(self, path: str | Path) -> None:
        from selfsup.image.models import Encoder

        super().__init__()
        self.classes, self.input_shape, config, tensors = read_classifier(path)
        self.encoder = Encoder(**config)  # sized as the file's own weights: checked above
        self.encoder.load_state_dict(
            {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}
        )
        self.register_buffer("mean", tensors["feature.mean"].float())
        self.register_buffer("std", tensors["feature.std"].float())
        self.head = torch.nn.Linear(len(self.mean), len(self.classes))
        self.head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head((self.encoder(x).float() - self.mean) / self.std), dim=1)


def meta_encoder(config: Any) -> torch.nn.Module:
    """The Encoder that `config` (its settings) describes, on the meta device: its weights'
    names and shapes and its feature width, with no memory allocated for them."""
    from selfsup.image.models import Encoder

    if not isinstance(config, dict):
        raise SelfsupError(f"expected an object of encoder settings, got {config!r:.80}")
    try:
        with torch.device("meta"):
            return Encoder(**config)
    except (TypeError, ValueError, KeyError) as e:
        raise SelfsupError(f"not an encoder's settings ({e})") from None


def read_classifier(
    path: str | Path,
) -> tuple[list[str], tuple[int, int, int], dict[str, Any], dict[str, torch.Tensor]]:
    """(classes, input shape, encoder settings, tensors) of a file from `classify`, every
    metadata field checked against the weights (and the pixel limit) before anything is sized
    by it; one line naming the file and the field otherwise."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no dict)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise SelfsupError(f"{path}: not a readable classifier file ({e})") from None
    if meta.get("format") != FORMAT:
        raise SelfsupError(f"{path}: not a selfsup classifier (made by `selfsup classify`)")

    def bad(field: str, what: str) -> SelfsupError:
        return SelfsupError(f"{path}: {field} {what}")

    fields: dict[str, Any] = {}
    for key in ("classes", "input_shape", "selfsup_encoder"):
        try:
            fields[key] = json.loads(meta[key])
        except KeyError:
            raise bad(f"metadata field {key!r}", "is missing") from None
        except json.JSONDecodeError as e:
            raise bad(f"metadata field {key!r}", f"is not JSON ({e})") from None
    classes, shape, config = fields["classes"], fields["input_shape"], fields["selfsup_encoder"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise bad("metadata field 'input_shape'", f"is {shape!r:.80}, expected [C, H, W] > 0")
    if shape[1] * shape[2] > (limit := max_pixels()):
        raise bad(
            "metadata field 'input_shape'",
            f"asks for {shape[1]}×{shape[2]} images, over the {limit:,} pixels allowed",
        )
    try:
        skeleton = meta_encoder(config)
    except SelfsupError as e:
        raise bad("metadata field 'selfsup_encoder'", str(e)) from None
    width = int(skeleton.feature_dim)
    expected = {f"encoder.{k}": tuple(v.shape) for k, v in skeleton.state_dict().items()}
    head = tensors.get("head.weight")
    rows = head.shape[0] if head is not None and head.ndim else 0
    expected.update(
        {
            "feature.mean": (width,),
            "feature.std": (width,),
            "head.weight": (rows, width),
            "head.bias": (rows,),
        }
    )
    for name, size in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != size:
            got = f"is {tuple(tensors[name].shape)}" if name in tensors else "is missing"
            raise bad(
                f"tensor {name!r}",
                f"{got}, expected {size} from metadata field 'selfsup_encoder' "
                f"(a {config.get('backbone')!r} encoder of {width}-d features)",
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise bad(f"tensor {extra[0]!r}", "is not a weight of the encoder named by its metadata")
    if config.get("in_channels") != shape[0]:
        raise bad(
            "metadata field 'input_shape'",
            f"says {shape[0]} channels, the encoder takes {config.get('in_channels')}",
        )
    if "image_size" in config and list(config["image_size"]) != shape[1:]:
        raise bad(
            "metadata field 'input_shape'",
            f"says {shape[1]}×{shape[2]} images, the encoder was built for "
            f"{'×'.join(map(str, config['image_size']))}",
        )
    if not (
        isinstance(classes, list)
        and all(isinstance(c, str) for c in classes)
        and len(set(classes)) == len(classes)
    ):
        raise bad("metadata field 'classes'", f"is {classes!r:.80}, expected distinct names")
    if len(classes) != rows:
        raise bad(
            "metadata field 'classes'",
            f"lists {len(classes)} classes but tensor 'head.weight' has {rows} rows",
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(f"tensor {name!r}", "holds NaN or infinite values")
    if not bool((tensors["feature.std"] > 0).all()):
        raise bad("tensor 'feature.std'", "has values <= 0, expected positive scales")
    return classes, tuple(shape), config, tensors  # type: ignore[return-value]


def image_files(spec: str) -> list[str]:
    """The image files of a folder (PATH or `folder:PATH`; recursively, sorted), or PATH itself
    when it is a file (one image)."""
    from selfsup.image.data.sources import images_under

    folder = spec.startswith("folder:")
    root = Path(spec[len("folder:") :] if folder else spec).expanduser()
    if root.is_file() and not folder:
        return [str(root)]
    if not root.is_dir():
        raise SelfsupError(
            f"{spec}: not a folder of images{'' if folder else ' nor an image file'}"
        )
    files = [str(p) for p in images_under(root, recursive=True)]
    if not files:
        raise SelfsupError(f"{spec}: no images in it")
    return files


def predict(
    classifier: str | Path,
    images: str,
    out: str | Path,
    *,
    batch_size: int = 256,
    threshold: float = LOW_CONFIDENCE,
    device: str = "auto",
) -> dict[str, Any]:
    """Label one image file or every image under a folder (see `image_files`); writes the CSV
    `out` batch by batch."""
    from tqdm.auto import tqdm

    from selfsup.engine.device import resolve_device

    model = Classifier(classifier).to(resolve_device(device))
    files = image_files(images)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flagged = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["path", "label", "confidence", *(f"p_{c}" for c in model.classes), "low_confidence"]
        )
        batches = file_batches(files, model.input_shape, batch_size)
        for batch, x in tqdm(
            batches, desc="predict", total=-(-len(files) // batch_size), disable=None
        ):
            x = x.to(model.mean.device)
            probs = model(x).cpu().numpy()
            for path, p in zip(batch, probs, strict=True):
                low = bool(p.max() < threshold)
                flagged += low
                writer.writerow(
                    [
                        path,
                        model.classes[int(p.argmax())],
                        f"{p.max():.4f}",
                        *(f"{v:.4f}" for v in p),
                        int(low),
                    ]
                )
    return {"out": str(out), "images": len(files), "low_confidence": flagged}
