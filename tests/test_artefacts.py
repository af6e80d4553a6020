"""Tampered or inconsistent artefacts (an index from `selfsup index`, a classifier from `selfsup
classify`) stop with one line naming the file and the field, when the file is opened, before any
work; `index` and `predict` take one image file as well as a folder."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from selfsup.cli.main import main
from selfsup.image.data import load_splits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 test digits of 3 classes in class folders, and the classifier and index that the real
    writers (`selfsup classify`, `selfsup index`) make of them."""
    root = tmp_path_factory.mktemp("artefacts")
    _, test = load_splits("digits")
    folder = root / "images"
    for c in range(3):
        for i in np.flatnonzero(test.y.numpy() == c)[:4]:
            path = folder / f"class{c}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(test.x[i][0].numpy()).save(path)
    classifier, index = root / "m.classifier", root / "m.index"
    argv = ["classify", str(digits_run), "--labels", f"folder:{folder}", "--out", str(classifier)]
    assert main(argv) == 0
    assert main(["index", str(digits_run), str(folder), "-o", str(index)]) == 0  # a bare folder
    return {"run": digits_run, "images": folder, "classifier": classifier, "index": index}


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _rewrite_classifier(
    src: Path, dst: Path, change: Callable[[dict[str, str], dict[str, torch.Tensor]], None]
) -> None:
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)


def _set(key: str, value: Any) -> Callable[[dict, dict], None]:
    return lambda meta, tensors: meta.update({key: value})


def _other_backbone(meta: dict, tensors: dict) -> None:
    meta["selfsup_encoder"] = json.dumps(
        json.loads(meta["selfsup_encoder"]) | {"backbone": "resnet18"}
    )


def _fewer_classes(meta: dict, tensors: dict) -> None:
    meta["classes"] = json.dumps(json.loads(meta["classes"])[:-1])


def _nan_head(meta: dict, tensors: dict) -> None:
    tensors["head.weight"][1, 2] = float("nan")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("classes", '["class0", "class1"'), "metadata field 'classes' is not JSON"),
        (_fewer_classes, "metadata field 'classes' lists 2 classes but tensor 'head.weight' has 3"),
        (
            _other_backbone,
            "tensor 'encoder.backbone.conv1.weight' is missing, expected (64, 1, 3, 3) from "
            "metadata field 'selfsup_encoder' (a 'resnet18' encoder of 512-d features)",
        ),
        (
            _set("input_shape", "[3, 50000, 50000]"),  # predict tried to allocate ~30 GB
            "metadata field 'input_shape' asks for 50000×50000 images, over the 89,478,485",
        ),
        (_set("input_shape", "[3, 8, 8]"), "'input_shape' says 3 channels, the encoder takes 1"),
        (_set("input_shape", "[1, 8]"), "metadata field 'input_shape' is [1, 8], expected [C, H"),
        (_nan_head, "tensor 'head.weight' holds NaN or infinite values"),
    ],
    ids=["not-json", "fewer-classes", "other-backbone", "huge", "channels", "2-d", "nan"],
)
def test_a_tampered_classifier_is_one_line_naming_the_field(
    made: dict[str, Path], tmp_path: Path, capsys, change, message: str
) -> None:
    bad, out = tmp_path / "bad.classifier", tmp_path / "p.csv"
    _rewrite_classifier(made["classifier"], bad, change)
    capsys.readouterr()
    assert main(["predict", str(bad), str(made["images"]), "-o", str(out)]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"selfsup: error: {bad}: ") and message in err, err
    assert not out.exists()  # refused when opened, before any image was read


def _rewrite_index(src: Path, dst: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(src) as z:
        fields = {k: z[k] for k in z.files}
    change(fields)
    with open(dst, "wb") as f:
        np.savez(f, **fields)


def _narrower(z: dict) -> None:
    z["features"] = z["features"][:, :32] / np.linalg.norm(z["features"][:, :32], axis=1)[:, None]


def _row(value: float, row: int) -> Callable[[dict], None]:
    def change(z: dict) -> None:
        z["features"][row] *= value

    return change


def _header_lies(src: Path, dst: Path) -> None:
    """features.npy whose header claims 10^9 rows in front of the 12 rows' bytes."""
    with np.load(src) as z:
        fields = {k: z[k] for k in z.files}
    with open(dst, "wb") as f:
        np.savez(f, **fields)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 256)}
    )
    with zipfile.ZipFile(dst) as old:
        members = {name: old.read(name) for name in old.namelist()}
    members["features.npy"] = header.getvalue() + fields["features"].tobytes()
    with zipfile.ZipFile(dst, "w") as new:
        for name, data in members.items():
            new.writestr(name, data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_narrower, "field 'features' is 32-d but the encoder of its run"),
        (
            lambda z: z.update(paths=z["paths"][:-1]),
            "field 'paths' has shape (11,) but 'features' has 12 rows",
        ),
        (
            lambda z: z.update(features=z["features"][:0], paths=z["paths"][:0]),
            "field 'features' has no rows",
        ),
        (_row(float("nan"), 3), "field 'features' holds NaN or infinite values in row 3"),
        (_row(3.0, 5), "field 'features' has norm 3, expected 1 (unit-norm embeddings) in row 5"),
        (lambda z: z.update(run=np.array("/no/such/run")), "field 'run' (/no/such/run): run"),
        (lambda z: z.pop("paths"), "no field 'paths'"),
        (_header_lies, "field 'features' claims shape (1000000000, 256) of float32"),
    ],
    ids=["narrower", "count", "empty", "nan", "norm", "run", "no-paths", "header"],
)
def test_a_tampered_index_is_one_line_naming_the_field(
    made: dict[str, Path], tmp_path: Path, capsys, change, message: str
) -> None:
    bad = tmp_path / "bad.index"
    if change is _header_lies:
        _header_lies(made["index"], bad)
    else:
        _rewrite_index(made["index"], bad, change)
    query = next(made["images"].rglob("*.png"))
    capsys.readouterr()
    assert main(["similar", str(bad), str(query), "-o", str(tmp_path / "n.png")]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"selfsup: error: {bad}: ") and message in err, err
    assert not (tmp_path / "n.png").exists()


def test_a_faiss_file_of_another_width_is_one_line(
    made: dict[str, Path], tmp_path: Path, capsys
) -> None:
    pytest.importorskip("faiss")
    from selfsup.image.use import ann

    index = tmp_path / "a.index"
    index.write_bytes(made["index"].read_bytes())
    other = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)
    ann.save(
        ann.build(other / np.linalg.norm(other, axis=1, keepdims=True))[0], ann.faiss_path(index)
    )
    capsys.readouterr()
    assert main(["similar", str(index), str(next(made["images"].rglob("*.png")))]) == 2
    err = _one_error_line(capsys)
    assert f"{ann.faiss_path(index)}: holds 12 vectors (16-d) but its index has 12 (256-d)" in err


def test_index_and_predict_take_one_image_file(
    made: dict[str, Path], tmp_path: Path, capsys
) -> None:
    image = sorted(made["images"].rglob("*.png"))[5]
    out = tmp_path / "p.csv"
    assert main(["predict", str(made["classifier"]), str(image), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(image)] and rows[0]["label"] == image.parent.name
    index = tmp_path / "one.index"
    assert main(["index", str(made["run"]), str(image), "-o", str(index)]) == 0
    capsys.readouterr()
    assert main(["similar", str(index), str(image), "-k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("  1. 1.000") and printed[0].endswith(str(image)), printed
    assert len(printed) == 2  # the one hit and "(exact search)"
    assert main(["predict", str(made["classifier"]), f"folder:{image}", "-o", str(out)]) == 2
    assert _one_error_line(capsys) == f"selfsup: error: folder:{image}: not a folder of images"
