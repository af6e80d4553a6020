"""`selfsup export RUN`: the encoder for use without selfsup.

- `onnx`: float [0, 1] images N×C×H×W (the run's size) -> features N×D, any batch size; runs in
  onnxruntime (checked against torch to 1e-4 at export).
- `torchscript`: the same function as a TorchScript file (`torch.jit.load`, no selfsup needed).
- `safetensors`: the weights with the architecture in the file's metadata (`selfsup_encoder`, the
  JSON of the run's encoder config), for `selfsup.image.models.Encoder(**config)`.

Each carries how raw pixels become its input (JSON, see `pixel_rule`): `selfsup_pixels` in the
safetensors metadata and in the ONNX model's metadata_props, `selfsup_pixels.json` among the
TorchScript file's extra files (`torch.jit.load(path, _extra_files={"selfsup_pixels.json": ""})`).

Normalisation (and colorization's RGB -> L) is inside the exported function: feed it images.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.image.data.pixels import run_pixels
from selfsup.image.runs import load_encoder

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
TRACE_DEPRECATED = r"`torch\.jit\.trace(_method)?` is deprecated"


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """Without the warnings tracing an encoder always gives: TracerWarning (Python branches on
    shapes: fixed by the run's image size; the batch axis stays dynamic, checked in onnxruntime)
    and torch.jit.trace's deprecation notice. Every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", TRACE_DEPRECATED, FutureWarning)
        yield


def export(run: str | Path, format: str = "onnx", out: str | Path | None = None) -> Path:
    """Write RUN's encoder in `format`; returns the file (default RUN/export/encoder.SUFFIX)."""
    if format not in FORMATS:
        raise SelfsupError(f"--format {format!r} is unknown; expected one of {', '.join(FORMATS)}")
    run = Path(run)
    encoder = load_encoder(run).float().eval()
    config = rundir.read_config(run)
    channels, h, w = rundir.input_shape(config)
    path = Path(out) if out else rundir.inside_run(run, "export", f"encoder{SUFFIXES[format]}")
    example = torch.rand(2, channels, h, w)
    pixels = json.dumps(pixel_rule(config))
    if format == "safetensors":
        tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
        meta = {"selfsup_encoder": json.dumps(encoder.config), "selfsup_pixels": pixels}
        rundir.atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    elif format == "torchscript":
        with torch.no_grad(), quiet_tracing():
            traced = torch.jit.trace(encoder, example)
        extra = {"selfsup_pixels.json": pixels}
        rundir.atomic_save(path, lambda tmp: traced.save(tmp, _extra_files=extra))
    else:
        rundir.atomic_save(path, lambda tmp: _onnx(encoder, example, tmp, path, pixels))
    return path


def _onnx(
    encoder: torch.nn.Module, example: torch.Tensor, tmp: str, path: Path, pixels: str
) -> None:
    """Write the ONNX model to `tmp` with `pixels` as its `selfsup_pixels` metadata and check it
    in onnxruntime (errors name `path`)."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise SelfsupError(
            "--format onnx needs onnx and onnxruntime: pip install 'selfsup[export]'"
        ) from None
    with torch.no_grad(), quiet_tracing():
        torch.onnx.export(
            encoder,
            (example,),
            tmp,
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            dynamo=False,  # the TorchScript-based exporter: no onnxscript rewrite needed
        )
        expected = encoder(example).numpy()
    model = onnx.load(tmp)
    onnx.helper.set_model_props(model, {"selfsup_pixels": pixels})
    onnx.save(model, tmp)
    session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": example.numpy()})[0]
    if not abs(got - expected).max() <= 1e-4 * max(1.0, abs(expected).max()):
        raise SelfsupError(f"{path}: the ONNX model does not match torch (> 1e-4); not kept")


def pixel_rule(config: dict[str, Any]) -> dict[str, Any]:
    """How a run's raw pixels become its encoder's input, for users of the export.

    `dtype` is the source's pixel type (recorded at pretraining; for older runs read from the
    run's data at export, null when it is gone); the exported function takes
    x = (raw - offset) / scale, float32 N×C×H×W (uint8 images may go in as they are: it divides
    them by 255), and normalises per channel itself: its backbone sees (x - mean[c]) / std[c]."""
    encoder = config["encoder"]
    channels, h, w = rundir.input_shape(config)
    pixels = run_pixels(config)
    rule = {
        **pixels,
        "mean": encoder["mean"],
        "std": encoder["std"],
        "channels": channels,
        "size": [h, w],
        "layout": "N×C×H×W, float32",
        "resize": "centre square of the short side, bilinear antialiased to size",
        "input": "x = (raw - offset) / scale in [0, 1]; the encoder computes (x - mean) / std",
    }
    if channels == 3 and pixels["dtype"] == "uint8":
        rule["channels_order"] = "RGB"
    if encoder.get("lightness"):
        rule["input"] += " of L (CIE Lab / 100) that it computes from RGB x itself"
    return rule
