"""Property-based tests: whatever a user hands the image loaders and the option checks, the
result is data or one SelfsupError line — never another exception."""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from selfsup.core.errors import SelfsupError
from selfsup.image.config import EvalConfig, PretrainConfig
from selfsup.image.data import load_splits
from selfsup.image.data.captions import load_captions

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def loads_or_one_line(load) -> object:
    try:
        return load()
    except SelfsupError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return None


# ---- npz contents --------------------------------------------------------------------------

dtypes = st.sampled_from([np.uint8, np.int64, np.float32, np.bool_, np.int8, np.uint16])
arrays = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=5, max_side=6))
labels = hnp.arrays(
    st.sampled_from([np.int64, np.int32, np.float64]),
    hnp.array_shapes(max_dims=2, max_side=8),
    elements=st.integers(-5, 12),
)
class_names = st.lists(st.text(max_size=5), max_size=12)


@st.composite
def npz_contents(draw) -> dict[str, np.ndarray]:
    """Mostly well-formed image arrays with labels of the right length (so that loading is
    often reached), mixed with arbitrary arrays and labels."""
    n = draw(st.integers(1, 6))
    shape = (n, draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 3])))
    kind = draw(st.sampled_from(["images", "gray", "labels", "arbitrary", "no x"]))
    x = draw(hnp.arrays(np.uint8, shape[:3] if kind == "gray" else shape))
    if kind == "arbitrary":
        x = draw(arrays)
    if kind == "labels":  # well-formed images, labels of the right length anywhere in -3..4
        y = draw(hnp.arrays(np.int64, n, elements=st.integers(-3, 4)))
    else:
        y = draw(st.one_of(labels, st.none(), hnp.arrays(np.int64, n, elements=st.integers(-1, 4))))
    content = {} if kind == "no x" else {"x": x}
    if y is not None:
        content["y"] = y
    classes = draw(st.one_of(st.none(), st.just(["a", "b", "c", "d", "e"]), class_names))
    if classes is not None:
        content["classes"] = np.array(classes, dtype=str)
    return content


@SETTINGS
@given(content=npz_contents())
def test_any_npz_loads_or_fails_in_one_line(content) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.npz"
        np.savez(path, **content)
        split = loads_or_one_line(lambda: load_splits(f"npz:{path}"))
        if split is not None:  # what loads is what the file says
            train, _ = split
            x = content["x"]
            held = len(split[1]) if split[1] is not None else 0
            assert x.dtype == np.uint8 and len(train) + held == len(x)
            if train.y is not None:
                assert (train.y >= -1).all()
                if "classes" in content:
                    assert (train.y < len(content["classes"])).all()


@SETTINGS
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".npz", ".npy", ""]))
def test_any_bytes_as_npz_fail_in_one_line(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content)
        assert loads_or_one_line(lambda: load_splits(f"npz:{path}")) is None


# ---- folder trees --------------------------------------------------------------------------


def _png(side: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side + 1)).save(buffer, format="PNG")
    return buffer.getvalue()


files = st.one_of(
    st.builds(_png, st.integers(1, 12), st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"])),
    st.binary(max_size=64),  # corrupt or empty "images"
)
names = st.sampled_from(["a.png", "b.jpg", "c.PNG", ".hidden.png", "notes.txt", "d.webp"])
trees = st.lists(
    st.tuples(
        st.sampled_from(["", "cat/", "dog/", "train/cat/", "test/cat/", "train/", "x/y/"]),
        names,
        files,
    ),
    max_size=8,
)


@SETTINGS
@given(tree=trees, size=st.one_of(st.none(), st.integers(-1, 16)))
def test_any_folder_tree_loads_or_fails_in_one_line(tree, size) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for sub, name, content in tree:
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / name).write_bytes(content)
        split = loads_or_one_line(lambda: load_splits(f"folder:{root}", image_size=size))
        if split is not None:
            train, test = split
            assert len(train) >= 1
            if train.channels == 1:  # a 16-bit grey first image: one channel of [0, 1] floats
                assert train.images(torch.tensor([0])).dtype == torch.float32
            else:
                assert train.channels == 3
            if test is not None:
                assert test.image_size == train.image_size


# ---- caption files -------------------------------------------------------------------------

cells = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12)


@SETTINGS
@given(
    rows=st.lists(st.lists(cells, min_size=0, max_size=4), max_size=6),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]),
    raw=st.one_of(st.none(), st.binary(max_size=80)),
)
def test_any_caption_file_loads_or_fails_in_one_line(rows, suffix, raw) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "a.png").write_bytes(_png(8, "RGB"))
        path = root / f"captions{suffix}"
        if raw is not None:
            path.write_bytes(raw)
        else:
            sep = "\t" if suffix == ".tsv" else ","
            path.write_text("\n".join(sep.join(r) for r in [["image", "caption"], *rows]))
        loads_or_one_line(lambda: load_captions(f"captions:{path}", holdout=0.0))


# ---- option values -------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.none(),
    st.text(max_size=3),
)


@pytest.mark.parametrize("config_class", [PretrainConfig, EvalConfig])
@SETTINGS
@given(data=st.data())
def test_any_option_value_is_accepted_or_refused_in_one_line(config_class, data) -> None:
    numeric = [
        f.name
        for f in dataclasses.fields(config_class)
        if isinstance(f.default, (int, float))
        and not isinstance(f.default, bool)
        or f.metadata.get("check")
    ]
    name = data.draw(st.sampled_from(numeric))
    value = data.draw(numbers)
    config = loads_or_one_line(lambda: config_class(**{name: value}))
    if config is not None:  # an accepted value is in the declared range
        rule = dataclasses.fields(config_class)[
            [f.name for f in dataclasses.fields(config_class)].index(name)
        ].metadata.get("check")
        if rule and value is not None:
            low = {">0": 0.0, ">=0": 0.0}.get(rule)
            if low is not None:
                assert value >= low and (rule != ">0" or value > 0)
            assert value == value  # never NaN
