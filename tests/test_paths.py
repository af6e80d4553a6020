"""Paths stay where the user put them (issue 34): caption files name images inside their own
folder; a symbolic link planted in a run folder does not make a command write outside it; what
a run writes gets the umask's permissions (safetensors' own writer makes files private)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_caption_files_refuse_images_outside_their_folder(tmp_path: Path, name: str) -> None:
    from selfsup.image.data.captions import load_captions

    _png(tmp_path / "outside.png")  # exists: only the path's escape is wrong
    _png(tmp_path / "data" / "a.png")
    name = str(tmp_path / "outside.png") if name == "ABSOLUTE" else name
    captions = tmp_path / "data" / "captions.tsv"
    captions.write_text(f"image\tcaption\na.png\ta cat\n{name}\ta dog\n")
    with pytest.raises(SelfsupError) as e:
        load_captions(f"captions:{captions}", holdout=0)
    assert str(e.value) == (
        f"{captions}, line 3: image {name!r} may lie outside the caption file's folder "
        f"{captions.parent}; paths must be relative and stay inside it (no '..'; link an outside "
        "folder in)"
    )


def test_caption_files_may_use_a_folder_linked_into_theirs(tmp_path: Path) -> None:
    from selfsup.image.data.captions import load_captions

    _png(tmp_path / "images" / "b.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "images")
    captions = tmp_path / "data" / "captions.jsonl"
    captions.write_text('{"image": "linked/b.png", "caption": "a bird"}\n')
    train, _ = load_captions(f"captions:{captions}", holdout=0)
    assert train.names == ["linked/b.png"] and train.captions == [["a bird"]]


def test_inside_run_refuses_a_link_that_leads_outside(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (run / "checkpoints").mkdir(parents=True)
    elsewhere.mkdir()
    (run / "eval").symlink_to(elsewhere)
    with pytest.raises(SelfsupError) as e:
        rundir.inside_run(run, "eval", "digits")
    assert str(e.value) == (
        f"{run / 'eval' / 'digits'} leads outside the run folder {run} (to "
        f"{elsewhere / 'digits'}) through a symbolic link; remove the link"
    )
    (run / "select").symlink_to(run / "checkpoints")  # a link inside the run is fine
    assert rundir.inside_run(run, "select", "a.csv") == run / "select" / "a.csv"
    (tmp_path / "linked-run").symlink_to(run)  # and so is a run folder reached by a link
    assert rundir.inside_run(tmp_path / "linked-run", "export") == tmp_path / "linked-run/export"


@pytest.fixture(scope="module")
def umask_022() -> Iterator[None]:
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, umask_022: None) -> Path:
    import selfsup

    out = tmp_path_factory.mktemp("paths") / "run"
    return selfsup.pretrain(data="digits", limit=128, batch_size=64, epochs=1, out=str(out))


def _modes(folder: Path) -> dict[str, str]:
    """Every file's and folder's permissions under `folder` that are not the umask's."""
    found = {}
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if not path.is_symlink() and mode != (0o755 if path.is_dir() else 0o644):
            found[str(path.relative_to(folder))] = oct(mode)
    return found


def test_every_file_a_run_writes_has_the_umask_permissions(run: Path, tmp_path: Path) -> None:
    from selfsup.image.use.classify import classify
    from selfsup.image.use.export import export

    export(run, "safetensors")
    export(run, "torchscript")
    labels = tmp_path / "labels.csv"
    labels.write_text("index,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(8)))
    classify(run, str(labels), run / "classifier.safetensors", device="cpu")
    assert (run / "export" / "encoder.safetensors").is_file()
    assert _modes(run) == {}


def test_a_planted_export_link_is_refused_and_nothing_written_outside(
    run: Path, tmp_path: Path
) -> None:
    from selfsup.image.use.export import export

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = run / "select"  # export's folder is taken by the test above: plant select's
    link.symlink_to(elsewhere)
    try:
        from selfsup.image.use.select import select

        with pytest.raises(SelfsupError, match="leads outside the run folder"):
            select(run, 4, strategy="random", device="cpu")
    finally:
        link.unlink()
    (run / "export").rename(run / "export-kept")
    (run / "export").symlink_to(elsewhere)
    try:
        with pytest.raises(SelfsupError, match="leads outside the run folder"):
            export(run, "safetensors")
    finally:
        (run / "export").unlink()
        (run / "export-kept").rename(run / "export")
    assert list(elsewhere.iterdir()) == []


def test_the_hf_export_of_a_language_stage_has_the_umask_permissions(
    tmp_path: Path, umask_022: None
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from selfsup.core.tokenizer import train_tokenizer
    from selfsup.lm.models.hf import save_hf

    tokenizer = train_tokenizer(["a small corpus"], "char")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=8, n_embd=8, n_layer=1, n_head=1)
    save_hf(tmp_path, GPT2LMHeadModel(config), tokenizer)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert _modes(tmp_path / "hf") == {}
