"""From a few labels to a classifier that labels a folder: `selfsup classify` + `predict`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.cli.main import main
from selfsup.image.data import load_splits


def _write_test_digits(folder: Path) -> dict[str, int]:
    """The 360 test digits as PNG files (in class-less sub-folders, to test recursion)."""
    _, test = load_splits("digits")
    truth = {}
    for i, (image, label) in enumerate(zip(test.x, test.y, strict=True)):
        path = folder / f"part{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(path)
        truth[str(path)] = int(label)
    return truth


def test_five_labels_per_class_label_the_test_digits(digits_run: Path, tmp_path: Path) -> None:
    train, _ = load_splits("digits")
    y = train.y.numpy()
    labels = tmp_path / "labels.csv"
    rng = np.random.default_rng(0)  # 5 labels per class, drawn as a person might pick them
    picks = [rng.choice(np.flatnonzero(y == c), 5, replace=False) for c in range(10)]
    rows = [(int(i), int(y[i])) for c, idx in enumerate(picks) for i in idx]
    labels.write_text("index,label\n" + "".join(f"{i},{c}\n" for i, c in rows))
    model = tmp_path / "digits.classifier"
    assert main(["classify", str(digits_run), "--labels", str(labels), "--out", str(model)]) == 0
    truth = _write_test_digits(tmp_path / "images")
    out = tmp_path / "predictions.csv"
    argv = ["predict", str(model), f"folder:{tmp_path / 'images'}", "-o", str(out)]
    assert main([*argv, "--batch-size", "50"]) == 0  # several batches: streamed
    predicted = list(csv.DictReader(out.open()))
    assert len(predicted) == 360 and set(predicted[0]) >= {"path", "label", "p_0", "p_9"}
    accuracy = np.mean([int(r["label"]) == truth[r["path"]] for r in predicted])
    # Measured 2026-12-01: 90.6%; the same subset through `selfsup evaluate`'s probe gives the
    # same (random 5-per-class subsets: 89.4-91.7%; the first 5 of each class: 82.8%).
    assert accuracy >= 0.85, accuracy
    for r in predicted[:20]:
        probabilities = [float(r[f"p_{c}"]) for c in range(10)]
        assert sum(probabilities) == pytest.approx(1, abs=1e-3)
        assert float(r["confidence"]) == pytest.approx(max(probabilities), abs=1e-4)
        assert r["low_confidence"] == str(int(max(probabilities) < 0.5))


def test_labels_from_class_folders_and_bad_label_files(
    digits_run: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "labeled"
    _, test = load_splits("digits")
    for i in range(30):
        path = folder / f"class{int(test.y[i])}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.x[i][0].numpy()).save(path)
    model = tmp_path / "m.classifier"
    argv = ["classify", str(digits_run), "--labels", f"folder:{folder}", "--out", str(model)]
    assert main(argv) == 0 and model.is_file()
    for text, message in [
        ("path,label\nmissing.png,3\n", "labels.csv:2: image missing.png does not exist"),
        ("index,label\n1,a\n2,b\n1,b\n", "labels.csv:4: 1 is listed twice (first on row 2)"),
        ("index,label\nx,a\n", "labels.csv:2: index 'x' is not a whole number"),
        ("file,class\n1,a\n", "labels.csv:1: expected the header"),
        ("index,label\n1,a\n2,a\n", "at least two classes"),
        ("index,label\n1,a\n99999,b\n", "index 99999 is past the"),
    ]:
        bad = tmp_path / "labels.csv"
        bad.write_text(text)
        capsys.readouterr()
        argv = ["classify", str(digits_run), "--labels", str(bad), "--out", str(tmp_path / "x")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["predict", str(bad), f"folder:{folder}", "-o", str(tmp_path / "p.csv")]) == 2
    # A corrupt file among many: decoded in a DataLoader worker, reported in one line all the same
    corrupt = sorted(folder.rglob("*.png"))[15]
    corrupt.write_bytes(b"not a png")
    capsys.readouterr()
    for argv in (
        ["predict", str(model), f"folder:{folder}", "-o", str(tmp_path / "p.csv")],
        ["index", str(digits_run), f"folder:{folder}", "-o", str(tmp_path / "i.npz")],
    ):
        assert main([*argv, "--batch-size", "4"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"selfsup: error: {corrupt}: cannot decode image"), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_finetune_matches_or_beats_the_frozen_probe(digits_run: Path, tmp_path: Path) -> None:
    """10 labels per class: the fine-tuned classifier against scikit-learn's logistic regression
    on the frozen features of the same labels (the probe it starts from, fitted independently)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from selfsup.image.evaluation import extract_features
    from selfsup.image.runs import load
    from selfsup.image.use.classify import Classifier

    train, test = load_splits("digits")
    y = train.y.numpy()
    rng = np.random.default_rng(0)
    picks = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), 10, replace=False) for c in range(10)]
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("index,label\n" + "".join(f"{i},{y[i]}\n" for i in picks))
    model = tmp_path / "ft.classifier"
    argv = ["classify", str(digits_run), "--labels", str(labels), "--out", str(model)]
    assert main([*argv, "--finetune"]) == 0
    classifier = Classifier(model)
    with torch.inference_mode():
        predicted = np.array(classifier.classes)[classifier(test.x).argmax(1).numpy()]
    finetuned = np.mean(predicted.astype(int) == test.y.numpy())

    encoder = load(digits_run)
    f_train = extract_features(encoder, train.subset(picks), progress=False)
    f_test = extract_features(encoder, test, progress=False)
    scale = StandardScaler().fit(f_train)
    frozen = LogisticRegression(max_iter=5000).fit(scale.transform(f_train), y[picks])
    reference = frozen.score(scale.transform(f_test), test.y.numpy())
    # Measured 2026-12-01: 93.1% fine-tuned (2 rounds chosen) against 92.8% for the reference
    # (AMD EPYC); 91.4% against 92.8% on an Intel Xeon (the rounds chosen follow the CPU's
    # rounding). "Matches": within two standard errors of an accuracy on these 360 test images
    # (2 x 1.4 points); a fine-tuning that hurts the features (too high a learning rate, the
    # probe's labels lost) falls far below.
    assert finetuned >= reference - 0.03, (finetuned, reference)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(
            classifier.encoder.state_dict().values(), encoder.state_dict().values(), strict=True
        )
    )
    assert changed  # the encoder itself was trained, not only the head
