"""selfsup.image.data: specs, validation errors, folders (in memory and lazy), loaders, resizing."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.core.errors import SelfsupError
from selfsup.image.data import (
    ImageData,
    adapt_images,
    batch_loader,
    load_splits,
    sources,
    stratified_indices,
)

MNIST_TEST = Path("/work/shared/data/mnist/test.npz")


def _raises_naming(spec: str, name: str, **kwargs) -> str:
    with pytest.raises(SelfsupError) as info:
        load_splits(spec, **kwargs)
    message = str(info.value)
    assert name in message and "\n" not in message, message
    return message


def _png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)  # size is (W, H)


# ---- digits and npz ----------------------------------------------------------------------------


def test_digits_split_scaling_and_classes():
    from sklearn.datasets import load_digits

    train, test = load_splits("digits")
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.dtype == torch.uint8 and train.x.shape[1:] == (1, 8, 8)
    assert train.classes == [str(i) for i in range(10)] and train.y.dtype == torch.int64
    # every image is some sklearn image scaled by 255/16; together the splits are all 1797 of them
    scaled = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    both = torch.cat([train.x, test.x])[:, 0].numpy()
    assert sorted(map(bytes, both)) == sorted(map(bytes, scaled))
    assert int(train.x.max()) == 255 and int(train.x.min()) == 0
    assert torch.bincount(test.y).min() >= 35  # stratified: 10 classes of ~36 each


def test_npz_dir_concatenates_train_parts_in_name_order(tmp_path):
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8) for n in (3, 2, 4)]
    ys = [np.array([0, 1, 2]), np.array([2, 2]), np.array([1, 0, 0, 2])]
    classes = np.array(["a", "b", "c"])
    # written out of order: the loader must sort by name
    np.savez(tmp_path / "train-2.npz", x=xs[1], y=ys[1], classes=classes)
    np.savez(tmp_path / "train-1.npz", x=xs[0], y=ys[0], classes=classes)
    np.savez(tmp_path / "test.npz", x=xs[2], y=ys[2], classes=classes)
    train, test = load_splits(f"npz:{tmp_path}")
    want = np.concatenate(xs[:2]).transpose(0, 3, 1, 2)
    assert train.x.shape == (5, 3, 5, 4) and np.array_equal(train.x.numpy(), want)
    assert train.y.tolist() == [0, 1, 2, 2, 2] and train.classes == ["a", "b", "c"]
    assert np.array_equal(test.x.numpy(), xs[2].transpose(0, 3, 1, 2))
    assert test.y.tolist() == [1, 0, 0, 2] and test.classes == ["a", "b", "c"]


def test_npz_file_gray_without_labels(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.savez(tmp_path / "one.npz", x=x)
    train, test = load_splits(f"npz:{tmp_path / 'one.npz'}")
    assert test is None and train.y is None and not train.has_labels
    assert train.x.shape == (2, 1, 3, 4) and np.array_equal(train.x[:, 0].numpy(), x)


@pytest.mark.skipif(not MNIST_TEST.is_file(), reason="shared MNIST test.npz not present")
def test_real_mnist_npz_file():
    train, test = load_splits(f"npz:{MNIST_TEST}")  # one labeled file: 20% is held out
    assert test.held_out and (len(train), len(test)) == (8000, 2000)
    assert train.x.shape[1:] == (1, 28, 28) and train.x.dtype == torch.uint8
    assert train.classes is not None and len(train.classes) == 10
    counts = torch.bincount(train.y) + torch.bincount(test.y)
    assert counts.tolist()[:2] == [980, 1135]  # the standard MNIST test counts
    assert torch.bincount(test.y).tolist()[:2] == [196, 227]  # stratified: 20% of each


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "found keys: images"),
        ({"x": np.zeros((2, 4, 4), np.complex64)}, "complex64; expected integers"),
        ({"x": np.full((2, 4, 4), 2.0, np.float32)}, "expected [0, 1]"),
        ({"x": np.zeros((2, 4), np.uint8)}, "expected N×H×W×C"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros(2, np.int64)}, "expected 3 integer"),
    ],
)
def test_npz_bad_contents_name_the_file(tmp_path, arrays, expected):
    np.savez(tmp_path / "train.npz", **arrays)
    assert expected in _raises_naming(f"npz:{tmp_path}", "train.npz")


def test_npz_missing_and_corrupt_files(tmp_path):
    _raises_naming(f"npz:{tmp_path / 'nope'}", "nope")
    _raises_naming(f"npz:{tmp_path}", str(tmp_path))  # no train*.npz in the dir
    (tmp_path / "bad.npz").write_bytes(b"not a zip file at all")
    _raises_naming(f"npz:{tmp_path / 'bad.npz'}", "bad.npz")
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((50, 8, 8), np.uint8))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:300])  # truncated archive
    _raises_naming(f"npz:{tmp_path / 'cut.npz'}", "cut.npz")


def test_unknown_spec_and_missing_torchvision_data(tmp_path):
    assert "cifar10" in _raises_naming("imagenet-42", "imagenet-42")
    # a bare path is read as what it holds: here an empty folder, so no images
    assert "no images" in _raises_naming(str(tmp_path), str(tmp_path))
    message = _raises_naming("cifar10", str(tmp_path), data_dir=str(tmp_path))
    assert "--download" in message


# ---- image folders -----------------------------------------------------------------------------


def test_folder_class_subfolders(tmp_path):
    _png(tmp_path / "zebra" / "1.png", (10, 20, 30))
    _png(tmp_path / "cat" / "b.PNG", (200, 0, 0))
    _png(tmp_path / "cat" / "a.jpg", (0, 0, 0))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    train, test = load_splits(f"folder:{tmp_path}")
    assert train.classes == ["cat", "zebra"] and test.held_out  # round(20% of 3) = 1 held out
    assert sorted(train.y.tolist() + test.y.tolist()) == [0, 0, 1] and len(test) == 1
    # 12×10 (W×H) images: default size = short side 10, a square centre crop
    both, labels = torch.cat([train.x, test.x]), torch.cat([train.y, test.y])
    assert both.shape == (3, 3, 10, 10) and both.dtype == torch.uint8
    colours = [image.flatten(1).float().mean(1).tolist() for image in both]
    assert [200, 0, 0] in colours  # b.PNG, lossless
    assert both[labels == 1][0, :, 5, 5].tolist() == [10, 20, 30]
    small, small_test = load_splits(f"folder:{tmp_path}", image_size=4)
    both, labels = torch.cat([small.x, small_test.x]), torch.cat([small.y, small_test.y])
    assert both.shape == (3, 3, 4, 4) and both[labels == 1][0, :, 0, 0].tolist() == [10, 20, 30]


def test_folder_flat_and_train_test_splits(tmp_path):
    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.png", (i, i, i))
    train, test = load_splits(f"folder:{tmp_path / 'flat'}")
    assert test is None and train.y is None and train.x[:, 0, 0, 0].tolist() == [0, 1, 2]
    _png(tmp_path / "split" / "train" / "a" / "0.png", (1, 1, 1))
    _png(tmp_path / "split" / "train" / "b" / "0.png", (2, 2, 2))
    _png(tmp_path / "split" / "val" / "b" / "0.png", (3, 3, 3))
    train, test = load_splits(f"folder:{tmp_path / 'split'}")
    assert train.classes == test.classes == ["a", "b"]
    assert train.y.tolist() == [0, 1] and test.y.tolist() == [1]  # labels follow the train classes
    assert test.x[0, :, 0, 0].tolist() == [3, 3, 3]


def test_folder_errors_name_the_folder_or_file(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises_naming(f"folder:{tmp_path / 'empty'}", "empty")
    _png(tmp_path / "imgs" / "ok.png", (0, 0, 0))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    _raises_naming(f"folder:{tmp_path / 'imgs'}", "broken.png")


def test_folder_lazy_path_matches_in_memory(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(3):
            pixels = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
            (tmp_path / c).mkdir(exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / c / f"{i}.png")
    eager, _ = load_splits(f"folder:{tmp_path}", image_size=6)
    monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 0)
    lazy, _ = load_splits(f"folder:{tmp_path}", image_size=6)
    assert lazy.x is None and lazy.lazy is not None and len(lazy) == 5  # 1 of 6 held out
    assert (lazy.channels, lazy.image_size) == (3, (6, 6))
    assert torch.equal(lazy.images([4, 0]), eager.x[[4, 0]])
    x, y = next(iter(batch_loader(lazy, 4, shuffle=False, drop_last=False)))
    assert torch.equal(x, eager.x[:4]) and y.tolist() == eager.y[:4].tolist()
    limited, _ = load_splits(f"folder:{tmp_path}", image_size=6, limit=2)
    first_b = eager.y.tolist().index(1)
    assert limited.y.tolist() == [0, 1] and torch.equal(limited.images([1]), eager.x[[first_b]])


# ---- limit / stratified_indices ---------------------------------------------------------------


def test_stratified_indices_proportional_first_per_class():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_indices(y, 10, seed=None)
    assert idx.tolist() == list(range(6)) + [60, 61, 62] + [90]
    assert stratified_indices(y, 500, seed=None).tolist() == list(range(100))
    assert stratified_indices(None, 3, seed=None).tolist() == [0, 1, 2]
    drawn = stratified_indices(y, 10, seed=1)
    assert np.bincount(y[drawn]).tolist() == [6, 3, 1]
    assert np.array_equal(drawn, stratified_indices(y, 10, seed=1))
    assert not np.array_equal(drawn, idx)
    # balanced with a remainder: 3 classes of 4, n = 7 -> shares 3/2/2, largest remainder first
    counts = np.bincount(np.array([0, 1, 2] * 4)[stratified_indices(np.array([0, 1, 2] * 4), 7)])
    assert sorted(counts.tolist()) == [2, 2, 3]


def test_limit_keeps_balanced_first_train_samples():
    full, test_full = load_splits("digits")
    train, test = load_splits("digits", limit=100)
    assert len(train) == 100 and len(test) == len(test_full)  # test untouched
    assert torch.bincount(train.y).tolist() == [10] * 10
    for c in range(10):  # the first 10 of each class, in the original order
        assert torch.equal(train.x[train.y == c], full.x[full.y == c][:10])


# ---- batch_loader ------------------------------------------------------------------------------


def _toy(n: int, labels: bool = True) -> ImageData:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 3).contiguous()
    return ImageData(x, torch.arange(n) % 3 if labels else None, None, "toy")


def _order(loader) -> list[int]:
    return [int(v) for x, _ in loader for v in x[:, 0, 0, 0]]


def test_batch_loader_batches_and_epoch_seeding():
    loader = batch_loader(_toy(10), 4, shuffle=True, drop_last=True, seed=3)
    batches = list(loader)
    assert len(batches) == 2 and all(x.shape == (4, 1, 2, 3) for x, _ in batches)
    assert all(x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in batches)
    assert all(torch.equal(y, x[:, 0, 0, 0].long() % 3) for x, y in batches)  # pairs kept
    epoch0 = _order(loader)
    assert epoch0 == _order(loader) and len(set(epoch0)) == 8
    loader.sampler.set_epoch(1)
    epoch1 = _order(loader)
    assert epoch1 != epoch0
    loader.sampler.set_epoch(0)
    assert _order(loader) == epoch0
    fresh = batch_loader(_toy(10), 4, shuffle=True, drop_last=True, seed=3)
    fresh.sampler.set_epoch(1)
    assert _order(fresh) == epoch1  # a resumed run sees the same order


def test_batch_loader_sequential_unlabeled_and_too_small():
    loader = batch_loader(_toy(5, labels=False), 2, shuffle=False, drop_last=False)
    assert _order(loader) == [0, 1, 2, 3, 4]
    assert [y.tolist() for _, y in loader] == [[-1, -1], [-1, -1], [-1]]
    with pytest.raises(SelfsupError, match="5 samples, fewer than batch size 8"):
        batch_loader(_toy(5), 8, shuffle=True, drop_last=True)


# ---- adapt_images ------------------------------------------------------------------------------


def test_adapt_images_channels_and_size():
    rgb = torch.tensor([100, 50, 200], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    gray = adapt_images(rgb, 1, (4, 4))
    assert gray.dtype == torch.uint8 and gray.shape == (2, 1, 4, 4)
    assert int(gray[0, 0, 0, 0]) == round(0.299 * 100 + 0.587 * 50 + 0.114 * 200)
    back = adapt_images(gray, 3, (8, 6))
    assert back.shape == (2, 3, 8, 6) and torch.equal(back[:, 0], back[:, 2])
    assert int(back[0, 1, 3, 3]) == int(gray[0, 0, 0, 0])  # a flat image stays flat
    ramp = torch.arange(48, dtype=torch.uint8).view(1, 1, 6, 8) * 5
    small = adapt_images(ramp, 1, (3, 5))
    # PIL's bilinear resize is antialiased too: an independent reference
    pil = Image.fromarray(ramp[0, 0].numpy()).resize((5, 3), Image.BILINEAR)
    assert small.shape == (1, 1, 3, 5)
    assert (small[0, 0].int() - torch.from_numpy(np.asarray(pil)).int()).abs().max() <= 1
    assert adapt_images(ramp, 1, (6, 8)) is ramp
