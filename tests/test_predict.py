"""``fcnseg predict``: files, folders and globs in; palette PNGs at the input size, overlays, probabilities
and a legend out; a bad file among good ones is reported on one line and the rest still written."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.cli.predict import expand_inputs, output_stems, renamed_stems, say
from tiny_models import random_image


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ckpt(tiny_ckpt):  # conftest's, under the name these tests use
    return tiny_ckpt


@pytest.fixture
def images(image_folder):
    return image_folder


def test_predict_writes_palette_pngs_overlays_probs_and_legend(tmp_path, ckpt, images, capsys):
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(ckpt), str(images / "a.png"), str(images / "more"),
                 str(images / "*.jpg"), "--out", str(out), "--overlay", "--probs"])
    assert code == 0, capsys.readouterr().err
    colors = [[40 * i, 255 - 40 * i, (97 * i) % 256] for i in range(5)]
    for stem, size in [("a", (70, 45)), ("b", (48, 64)), ("c", (41, 33))]:
        png = Image.open(out / f"{stem}.png")
        assert png.mode == "P" and png.size == size
        ids = np.asarray(png)
        assert ids.max() < 5
        palette = np.array(png.getpalette()[:15]).reshape(5, 3)
        assert palette.tolist() == colors
        overlay = Image.open(out / f"{stem}_overlay.jpg")
        assert overlay.size == size and overlay.mode == "RGB"
        probs = np.load(out / f"{stem}_probs.npy")
        assert probs.dtype == np.float16 and probs.shape == (5, size[1], size[0])
        assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
        assert np.array_equal(probs.argmax(0), ids) or (probs.argmax(0) == ids).mean() > 0.99  # float16 ties
    legend = Image.open(out / "legend.png")
    assert legend.height >= 5 * 20
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "wrote 3 prediction(s)" in capsys.readouterr().out


def test_prediction_matches_the_segmenter(tmp_path, ckpt, images):
    from fcnseg import Segmenter

    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), str(images / "a.png"), "--out", str(out), "--quiet"]) == 0
    expected = Segmenter.from_checkpoint(ckpt)(Image.open(images / "a.png"))
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), expected)


def test_a_bad_file_among_good_ones(tmp_path, ckpt, images, capsys):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(ckpt), str(images), str(images / "missing.png"),
                 str(images / "*.gif"), "--out", str(out)])
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fcnseg:")]
    assert len(err) == 4, err  # broken, empty, missing, and a pattern that matches nothing
    assert any("broken.png" in e for e in err) and any("missing.png" in e for e in err)
    assert any("*.gif" in e for e in err) and any("empty.jpg" in e for e in err)
    assert (out / "a.png").is_file() and (out / "b.png").is_file() and (out / "legend.png").is_file()
    assert not (out / "broken.png").exists()


def test_a_line_said_under_an_open_progress_bar_starts_its_own_line(capsys):
    """The Ray engine's bar belongs to the library; a failed image is said while it is drawn. The line must not
    be glued to the bar's text (CI once read `43%|...| 3/7 [...]fcnseg: broken.png: ...`)."""
    import sys

    from tqdm import tqdm

    with tqdm(total=7, unit="image", file=sys.stderr) as bar:
        bar.update(3)
        say("in/broken.png: unreadable image")
        bar.update(4)
    err = capsys.readouterr().err.splitlines()
    assert "fcnseg: in/broken.png: unreadable image" in err, err


def test_a_library_log_record_under_an_open_progress_bar_starts_its_own_line(capsys):
    """The same for what the library logs while a bar is drawn (a training epoch's, an evaluation's): the CLI's
    handler shows it as its own line."""
    import logging
    import sys

    from tqdm import tqdm

    from fcnseg.cli import _LineHandler, _LogFormat

    handler = _LineHandler()
    handler.setFormatter(_LogFormat())
    log = logging.getLogger("fcnseg.test_bar")
    log.addHandler(handler)
    try:
        with tqdm(total=4, file=sys.stderr) as bar:
            bar.update(1)
            log.warning("checkpoint saved late")
    finally:
        log.removeHandler(handler)
    assert "fcnseg: warning: checkpoint saved late" in capsys.readouterr().err.splitlines()


def test_large_images_are_tiled_to_the_input_size(tmp_path, ckpt):
    src = tmp_path / "big.png"
    random_image(300, 420, 4).save(src)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), str(src), "--out", str(out), "--tile", "160",
                 "--overlap", "64", "--flip", "--scales", "0.75", "1"]) == 0
    assert Image.open(out / "big.png").size == (420, 300)


def test_missing_builtin_checkpoint_is_one_line(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr("fcnseg.weights.checkpoint.WEIGHTS_DIR", tmp_path / "no-weights")  # an install without them
    code = main(["predict", str(images / "a.png"), "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "camvid" in err[0] and "--checkpoint" in err[0]


def test_inputs_expand_without_repeats_and_stems_stay_unique(images):
    files, problems = expand_inputs([str(images), str(images / "a.png"), str(images / "**" / "*.png")])
    assert [f.name for f in files] == ["a.png", "b.jpg", "c.png"] and problems == []
    inputs = [images / "x.png", images / "more" / "x.jpg", images / "y.png", images / "z" / "more_x.png"]
    stems = output_stems(inputs)
    assert stems == ["x", "more_x", "y", "z_more_x"]  # the first keeps its name; a later one is renamed
    assert renamed_stems(inputs, stems) == [f"x.png from {images / 'x.png'}; {inputs[1]} written as more_x.png",
                                            f"more_x.png from {inputs[1]}; {inputs[3]} written as z_more_x.png"]
