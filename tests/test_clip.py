"""CLIP: its loss and temperature, caption sources and their bad input, the text transformer,
zero-shot classification and retrieval metrics, and a short run on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

import selfsup
from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.image.data.captions import load_captions, parse_classes, parse_templates
from selfsup.image.evaluation.retrieval import chance_metrics, retrieval_metrics
from selfsup.image.evaluation.zero_shot import topk_accuracy, zero_shot_classifier
from selfsup.image.losses.clip import INIT_LOGIT_SCALE, CLIPLoss, LogitScale, clip_loss
from selfsup.image.models.text import TextTransformer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---- loss ------------------------------------------------------------------------------------


def test_clip_loss_matches_hand_computation() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # cosines use the directions only
    text = torch.tensor([[2.0, 0.0], [0.6, 0.8]])
    # cosine similarities I·Tᵀ = [[1, 0.6], [0, 0.8]], scale 2
    lse = lambda *a: math.log(sum(math.exp(v) for v in a))  # noqa: E731
    per_image = [lse(2, 1.2) - 2, lse(0, 1.6) - 1.6]
    per_text = [lse(2, 0) - 2, lse(1.2, 1.6) - 1.6]
    expected = (sum(per_image) / 2 + sum(per_text) / 2) / 2
    assert clip_loss(image, text, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_is_symmetric_and_learns_its_scale() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    torch.testing.assert_close(clip_loss(a, b, 5.0), clip_loss(b, a, 5.0))
    loss = CLIPLoss()
    assert loss.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    loss(a, a.clone()).backward()  # matched pairs: a sharper softmax lowers the loss
    assert loss.logit_scale.log_scale.grad < 0


def test_logit_scale_is_capped_at_100() -> None:
    scale = LogitScale()
    assert scale.log_scale.item() == pytest.approx(INIT_LOGIT_SCALE)
    with torch.no_grad():
        scale.log_scale.fill_(7.0)  # e^7 ≈ 1097, as an optimizer step may leave it
    scale.clamp_()  # after the step
    assert scale.log_scale.item() == pytest.approx(math.log(100), rel=1e-6)
    assert scale().item() == pytest.approx(100.0, rel=1e-5)


def _naive_clip_loss_and_scale_grad(
    image: Tensor, text: Tensor, log_scale: float
) -> tuple[float, float]:
    """Float64 loops: the symmetric CLIP loss and its derivative in the log-scale ln s.

    With c the cosines and p the softmax of s·c per row, ∂/∂s of a row's CE is Σ_j p_j c_j - c_ii,
    so ∂L/∂ln s = s · the mean of that over both directions' rows.
    """
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    img, txt = [unit(r) for r in image.tolist()], [unit(r) for r in text.tolist()]
    n, s = len(img), math.exp(log_scale)
    cos = [
        [sum(a * b for a, b in zip(img[i], txt[j], strict=True)) for j in range(n)]
        for i in range(n)
    ]
    loss = grad = 0.0
    for rows in (cos, [list(col) for col in zip(*cos, strict=True)]):
        for i, row in enumerate(rows):
            top = max(s * c for c in row)
            exps = [math.exp(s * c - top) for c in row]
            z = sum(exps)
            loss += (top + math.log(z) - s * row[i]) / (2 * n)
            grad += s * (sum(e * c for e, c in zip(exps, row, strict=True)) / z - row[i]) / (2 * n)
    return loss, grad


@pytest.mark.parametrize("log_scale", [INIT_LOGIT_SCALE, math.log(100)])
def test_clip_loss_and_scale_gradient_match_a_float64_formula(log_scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    scale = LogitScale(init=log_scale).double()
    scale.clamp_()  # at the cap: exactly where the optimizer's clamp leaves it
    loss = clip_loss(image.double(), text.double(), scale())
    loss.backward()
    stored = scale.log_scale.item()  # ln s as float32 holds it
    expected_loss, expected_grad = _naive_clip_loss_and_scale_grad(image, text, stored)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert expected_grad > 0.1  # random pairs: the loss wants a softer softmax
    # at the cap too: a clamp in forward would make this 0 and pin the scale at 100 for good
    assert scale.log_scale.grad.item() == pytest.approx(expected_grad, rel=1e-10)


def test_logit_scale_comes_back_down_from_the_cap() -> None:
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    scale = LogitScale(init=math.log(100))
    optimizer = torch.optim.SGD(scale.parameters(), lr=0.1)
    clip_loss(image, text, scale()).backward()
    optimizer.step()
    scale.clamp_()
    assert scale().item() < 99.0


@pytest.mark.parametrize("log_scale", [INIT_LOGIT_SCALE, math.log(100)])
def test_clip_loss_matches_open_clip_values_and_gradients(log_scale: float) -> None:
    open_clip_loss = pytest.importorskip("open_clip.loss")
    g = torch.Generator().manual_seed(3)
    image = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ours = LogitScale(init=log_scale).double()
    ours.clamp_()
    theirs = torch.tensor(ours.log_scale.item(), dtype=torch.float64, requires_grad=True)
    loss = clip_loss(image, text, ours())
    grads = torch.autograd.grad(loss, [image, text, ours.log_scale])
    # open_clip's model normalises the features and passes logit_scale.exp()
    reference = open_clip_loss.ClipLoss()(
        F.normalize(image, dim=1), F.normalize(text, dim=1), theirs.exp()
    )
    expected = torch.autograd.grad(reference, [image, text, theirs])
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert expected[2].abs() > 0.01  # open_clip's scale has a gradient at the cap too


# ---- text transformer ------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["eot", "mean"])
def test_text_vector_ignores_padding_but_not_tokens(pooling: str) -> None:
    torch.manual_seed(0)
    model = TextTransformer(20, width=16, layers=2, heads=2, context=8, pooling=pooling).eval()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0], [5, 9, 7, 0, 0]])
    out = model(padded)
    torch.testing.assert_close(out[:1], model(short), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # the middle token matters


# ---- caption sources -------------------------------------------------------------------------


def _png(path: Path, value: int) -> None:
    Image.fromarray(np.full((12, 16, 3), value, dtype=np.uint8)).save(path)


def test_templates_and_classes_are_checked() -> None:
    assert parse_templates("a photo of a {}.|a {} again") == ["a photo of a {}.", "a {} again"]
    with pytest.raises(SelfsupError, match=r"--templates: 'a photo' must contain '\{\}'"):
        parse_templates("a {}|a photo")
    assert parse_classes("cat, dog", ["c", "d"], "x") == ["cat", "dog"]
    with pytest.raises(SelfsupError, match="--classes gives 3 names but --data x has 2 classes"):
        parse_classes("cat,dog,cow", ["c", "d"], "x")


def test_labeled_data_becomes_template_captions() -> None:
    train, test = load_captions("digits", templates="a photo of a {}.|a {} digit")
    assert train.templated and train.captions[3] == ["a photo of a 3.", "a 3 digit"]
    assert torch.equal(
        train.images.y, selfsup.image.data.load_splits("digits")[0].y
    )  # groups = labels
    assert test is not None and len(test.images) == 360


def test_caption_npz_holds_out_the_last_images_and_counts_empty_captions(tmp_path: Path) -> None:
    path = tmp_path / "pairs.npz"
    captions = np.array([["a", "b"], ["c", ""], ["d", "e"], ["", ""], ["f", "g"]])
    np.savez(path, x=np.arange(5, dtype=np.uint8).repeat(48).reshape(5, 4, 4, 3), captions=captions)
    with pytest.raises(SelfsupError) as e:
        load_captions(f"npz:{path}")
    message = str(e.value)
    assert "3 of 10 captions are bad (first: image 1 caption 1 is empty)" in message
    assert "--skip-bad" in message and "\n" not in message
    with pytest.warns(UserWarning, match="skipped 3 of 10 captions"):
        train, held = load_captions(f"npz:{path}", skip_bad=True, holdout=0.25)
    # image 3 had no caption left; of the 4 others the last one is held out
    assert train.captions == [["a", "b"], ["c"], ["d", "e"]] and len(train.skipped) == 3
    assert held is not None and held.captions == [["f", "g"]]
    assert held.images.x[0, 0, 0, 0] == 4 and held.images.y.tolist() == [0]


def test_tsv_and_jsonl_rows_group_by_image_and_count_bad_rows(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 10)
    _png(tmp_path / "b.png", 200)
    (tmp_path / "c.png").write_text("not an image")
    rows = [
        "image\tcaption",
        "a.png\tA red  ball .",
        "b.png\ta dog",
        "a.png\tthe ball",
        "gone.png\ta cat",  # missing image
        "b.png\t ",  # empty caption
        "c.png\ta tree",  # undecodable
    ]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    with pytest.raises(SelfsupError, match=r"3 of 6 rows are bad \(first: line 5: image gone.png"):
        load_captions(f"captions:{tsv}", holdout=0)
    with pytest.warns(UserWarning, match="skipped 3 of 6 rows"):
        train, held = load_captions(f"captions:{tsv}", holdout=0, skip_bad=True, image_size=8)
    assert held is None and train.names == ["a.png", "b.png"]
    assert train.captions == [["A red ball .", "the ball"], ["a dog"]]
    assert tuple(train.images.x.shape) == (2, 3, 8, 8) and train.images.x[1].min() == 200

    jsonl = tmp_path / "pairs.jsonl"
    lines = [{"image": "a.png", "captions": ["one", "two"]}, {"image": "b.png", "caption": "x"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    train, _ = load_captions(str(jsonl), holdout=0)
    assert train.captions == [["one", "two"], ["x"]]
    texts, owners = train.caption_pairs()
    assert texts == ["one", "two", "x"] and owners.tolist() == [0, 0, 1]


def test_caption_file_needs_image_and_caption_columns(tmp_path: Path) -> None:
    csv = tmp_path / "pairs.csv"
    csv.write_text("picture,caption\na.png,hi\n")
    with pytest.raises(SelfsupError, match="needs an image column"):
        load_captions(f"captions:{csv}")


@pytest.mark.skipif(not (SHARED_DATA / "flickr8k").is_dir(), reason="needs ../shared/data/flickr8k")
def test_flickr8k_split_holds_out_the_last_200_images() -> None:
    path = SHARED_DATA / "flickr8k" / "pairs-64px.npz"
    train, held = load_captions(f"npz:{path}")
    assert held is not None and (len(train.images), len(held.images)) == (800, 200)
    names = np.load(path)["filenames"]
    assert held.names == [str(n) for n in names[800:]]
    assert all(len(c) == 5 for c in held.captions)


# ---- zero-shot and retrieval -----------------------------------------------------------------


def test_zero_shot_classifier_averages_normalised_prompts() -> None:
    vectors = {
        "a cat": [2.0, 0.0],
        "the cat": [0.0, 1.0],
        "a dog": [-1.0, 0.0],
        "the dog": [-3.0, 0.0],
    }
    encode = lambda texts: torch.tensor([vectors[t] for t in texts])  # noqa: E731
    weights = zero_shot_classifier(encode, ["cat", "dog"], ["a {}", "the {}"])
    torch.testing.assert_close(weights, torch.tensor([[0.5**0.5, 0.5**0.5], [-1.0, 0.0]]))
    images, labels = torch.tensor([[1.0, 1.0], [-1.0, 0.1]]), torch.tensor([0, 0])
    assert topk_accuracy(images, labels, weights, ks=(1, 2, 5)) == {"top1": 50.0, "top2": 100.0}


def test_retrieval_metrics_match_a_hand_example() -> None:
    images = torch.eye(3)  # similarity[i, j] = caption j's i-th coordinate
    captions = torch.tensor([[0.8, 0.6, 0], [0, 0.6, 0.8], [0.6, 0, 0.8], [0, 0.8, 0.6]])
    owners = [0, 0, 1, 2]
    # image→text ranks: image 0 -> 1 (caption 0), image 1 -> 4, image 2 -> 3
    # text→image ranks: caption 0 -> 1, caption 1 -> 3, caption 2 -> 3, caption 3 -> 2
    m = retrieval_metrics(images, captions, owners)
    assert m["i2t_r@1"] == pytest.approx(100 / 3) and m["i2t_r@5"] == 100
    assert m["i2t_median_rank"] == 3
    assert m["t2i_r@1"] == 25 and m["t2i_r@5"] == 100 and m["t2i_median_rank"] == 2
    chance = chance_metrics(owners, 3)
    # image→text at k=1: image 0 has 2 of 4 captions, the others 1 of 4
    assert chance["i2t_r@1"] == pytest.approx(100 * (0.5 + 0.25 + 0.25) / 3)
    assert chance["t2i_r@1"] == pytest.approx(100 / 3) and chance["t2i_r@10"] == 100


# ---- a short run on digits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "run"
    return selfsup.pretrain(
        method="clip",
        data="digits",
        limit=512,
        batch_size=64,
        epochs=3,
        lr=3e-3,
        recipe="none",
        text_width=32,
        text_layers=1,
        text_heads=2,
        online_probe=False,
        out=str(out),
    )


def test_zero_shot_of_a_short_run_beats_chance(digits_run: Path, capsys) -> None:
    from selfsup.image.evaluation.zero_shot import zero_shot_evaluation

    results = zero_shot_evaluation(digits_run)  # digits' 360 test images, the run's templates
    assert results["chance_top1"] == 10 and results["top1"] > 40, results["top1"]
    assert main(["zero-shot", str(digits_run), "--templates", "a photo of a {}."]) == 0
    assert "zero-shot top-1" in capsys.readouterr().out
    weights = load_file(digits_run / "clip.safetensors")
    learned = weights["logit_scale.log_scale"].item()
    assert learned != pytest.approx(INIT_LOGIT_SCALE) and learned <= math.log(100) + 1e-6
    assert (digits_run / "tokenizer" / "tokenizer.json").is_file()


def test_cli_reports_bad_classes_and_templates_in_one_line(digits_run: Path, capsys) -> None:
    assert main(["zero-shot", str(digits_run), "--classes", "zero,one"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error: --classes gives 2 names") and "\n" not in err
    assert main(["zero-shot", str(digits_run), "--templates", "a photo"]) == 2
    assert "must contain '{}'" in capsys.readouterr().err
    assert main(["retrieve", str(digits_run)]) == 2  # template captions: no retrieval metrics
    assert "zero-shot" in capsys.readouterr().err


def test_bad_caption_input_stops_before_the_run_directory(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match="--templates"):
        selfsup.pretrain(method="clip", data="digits", templates="x", out=str(tmp_path / "a"))
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image\tcaption\nmissing.png\ta cat\n")
    with pytest.raises(SelfsupError, match="--skip-bad"):
        selfsup.pretrain(method="clip", data=f"captions:{tsv}", out=str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
