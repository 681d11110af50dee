"""Uncertainty (entropy and margin by hand, ``predict --uncertainty`` PNGs, ``data rank`` CSV order) and predict's
input checks (before the model loads, multi-frame refusal, .gif, no lone legend, the 16-bit message)."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.inference.uncertainty import normalized_entropy, one_minus_margin, to_png_array, uncertainty


def test_entropy_and_margin_by_hand():
    # pixels: one-hot, uniform over 4, (0.5, 0.5, 0, 0), (0.7, 0.2, 0.1, 0)
    p = torch.tensor([[1, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0], [0.7, 0.2, 0.1, 0]]).T.reshape(4, 1, 4)
    ent = normalized_entropy(p)[0]
    want = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(4)
    assert torch.allclose(ent, torch.tensor([0.0, 1.0, 0.5, want]), atol=1e-6)
    assert torch.allclose(one_minus_margin(p)[0], torch.tensor([0.0, 1.0, 1.0, 0.5]), atol=1e-6)
    assert torch.equal(uncertainty(p, "margin"), one_minus_margin(p))
    with pytest.raises(FcnsegError, match="valid: entropy, margin"):
        uncertainty(p, "variance")
    np.testing.assert_array_equal(to_png_array(torch.tensor([[0.0, 0.5, 1.0, 1.2]])), [[0, 128, 255, 255]])


class HalfSure(torch.nn.Module):
    """Sure (class 0) on the left half of every image, a coin flip on the right half; brighter images
    are less sure everywhere, so a ranking by mean uncertainty follows brightness."""

    num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        logits = torch.zeros(b, 2, h, w)
        bright = x.mean((1, 2, 3)).view(b, 1, 1)
        logits[:, 0, :, : w // 2] = 4 - bright  # favoured, less so when bright (normalised means -2..2.3)
        return logits


@pytest.fixture()
def half_sure(monkeypatch):
    from fcnseg.inference import segmenter as inference
    from fcnseg.cli import predict

    def load(checkpoint, backend=None, **kwargs):
        return inference.Segmenter(HalfSure(), channels_last=False, **{k: v for k, v in kwargs.items()
                                                                       if k in ("max_side", "scale")})

    monkeypatch.setattr(predict, "load_segmenter", load)


def test_predict_writes_an_8bit_uncertainty_png(tmp_path, half_sure):
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--uncertainty",
                 "--no-progress"]) == 0
    u = Image.open(tmp_path / "o" / "a_uncertainty.png")
    assert u.mode == "L" and u.size == (30, 20)
    arr = np.asarray(u)
    assert (arr[:, 15:] == 255).all()  # a coin flip: entropy 1
    assert (arr[:, :15] < 128).all()
    assert not (tmp_path / "o" / "a_probs.npy").exists()  # probabilities only when asked


def test_rank_orders_images_by_mean_uncertainty(tmp_path, half_sure, capsys):
    for name, level in (("dark", 10), ("bright", 250), ("mid", 128)):
        Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "rank.csv"
    code = main(["data", "rank", "--checkpoint", "camvid", str(tmp_path), "--out", str(out), "--no-progress"])
    assert code == 1  # the broken image is reported and counted
    assert "broken.png" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["bright.png", "mid.png", "dark.png"]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    values = [float(r["mean_uncertainty"]) for r in rows]
    assert values[0] > values[1] > values[2] >= 0.5  # the right half alone contributes 0.5
    assert main(["data", "rank", "--checkpoint", "camvid", str(tmp_path / "dark.png"), "--out", str(out)]) == 1
    assert "rank.csv: exists already" in capsys.readouterr().err


# ---- predict's inputs: checked before the model loads, multi-frame files refused, .gif listed, no lone legend

def test_predict_inputs_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from fcnseg.cli import predict

    def never(*a, **k):
        raise AssertionError("the model was loaded for inputs that name no image")

    monkeypatch.setattr(predict, "load_segmenter", never)
    assert main(["predict", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.jpg: no such image file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()


def test_multi_frame_files_are_refused_and_gif_folders_listed(tmp_path, half_sure, capsys):
    frames = [Image.fromarray(np.full((12, 16, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    out = tmp_path / "o"
    assert main(["predict", str(tmp_path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("has 2 frames" in ln and "save each frame as its own file" in ln for ln in err)
    assert not (out / "legend.png").exists()  # nothing was segmented: no legend on its own
    frames[0].save(tmp_path / "one.gif")
    assert main(["predict", str(tmp_path / "one.gif"), "--out", str(out), "--no-progress"]) == 0
    assert (out / "one.png").is_file() and (out / "legend.png").is_file()


def test_16_bit_images_are_refused_saying_what_is_accepted(tmp_path):
    from fcnseg.data.io import DataFileError, read_image

    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataFileError, match=r"deep.png: image has mode I;16 \(16-bit or float\); fcnseg reads "
                                            r"8-bit images \(RGB, RGBA, grey or palette\)"):
        read_image(tmp_path / "deep.png")
