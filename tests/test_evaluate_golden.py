"""``fcnseg evaluate`` end to end on a tiny labelled set whose confusion matrix is worked out by hand.

The model predicts class 1 ("square") on every pixel (its score layers are zero but for score_fr's bias), checked
first through the Segmenter. The two 24 x 32 label maps:

    a.png: row 0 ignored (32 px), rows 1-11 background (11 x 32 = 352), rows 12-23 square (12 x 32 = 384)
    b.png: rows 0-3 ignored (128 px), rows 4-23 square (20 x 32 = 640)

so, rows = ground truth, columns = prediction (background, square, disc):

    [[0, 352, 0],
     [0, 1024, 0],
     [0, 0, 0]]

1376 labelled pixels; the 160 ignored ones are counted nowhere. Pixel accuracy 1024 / 1376. IoU: background 0,
square 1024 / 1376, disc undefined (absent from the ground truth and never predicted: left out of the mean), so mean
IU = (0 + 1024 / 1376) / 2. Accuracy (recall): background 0, square 1, so mean accuracy 1/2. ``--exclude-absent``
leaves out disc (absent from the ground truth), which changes nothing here; leaving out background (never
predicted) instead would make mean IU 1024 / 1376.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.weights.checkpoint import make_record, save_checkpoint

from tiny_models import TINY, random_image

CLASSES = ["background", "square", "disc"]


@pytest.fixture
def labelled(tmp_path):
    root = tmp_path / "data"
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    a = np.zeros((24, 32), np.uint8)
    a[0], a[12:] = 255, 1
    b = np.ones((24, 32), np.uint8)
    b[:4] = 255
    for i, (name, mask) in enumerate((("a", a), ("b", b))):
        random_image(24, 32, seed=i).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits" / "val.txt").write_text("a\nb\n")
    (root / "splits" / "train.txt").write_text("a\nb\n")
    return root


@pytest.fixture
def always_square(tmp_path):
    import fcnseg

    model = fcnseg.build_model(TINY, num_classes=3).eval()
    with torch.no_grad():
        for conv in [model.score_fr, *model.score_skip.values()]:
            conv.weight.zero_()
            conv.bias.zero_()
        model.score_fr.bias.copy_(torch.tensor([-4.0, 4.0, -4.0]))
    path = save_checkpoint(model, tmp_path / "ckpt" / "square.safetensors",
                           make_record(model, classes=CLASSES, colors=[[0, 0, 0], [255, 0, 0], [0, 0, 255]]))
    return path


def test_evaluate_gives_the_hand_computed_confusion_matrix(tiny, labelled, always_square, tmp_path, capsys):
    from fcnseg.cli import main
    from fcnseg.inference.segmenter import Segmenter

    seg = Segmenter.from_checkpoint(always_square)
    for name in ("a", "b"):  # the premise: class 1 everywhere
        assert (seg(Image.open(labelled / "images" / f"{name}.png")) == 1).all()

    out = tmp_path / "scores.json"
    assert main(["evaluate", "--checkpoint", str(always_square), "--dataset", "folder", "--root", str(labelled),
                 "--split", "val", "--json", str(out), "--workers", "0", "--exclude-absent"]) == 0
    scores = json.loads(out.read_text())
    assert scores["confusion_matrix"] == [[0, 352, 0], [0, 1024, 0], [0, 0, 0]]
    assert scores["num_pixels"] == 1376
    assert scores["pixel_accuracy"] == pytest.approx(1024 / 1376)
    assert scores["mean_iou"] == pytest.approx((0 + 1024 / 1376) / 2)
    assert scores["mean_accuracy"] == pytest.approx(0.5)
    assert scores["fw_iou"] == pytest.approx((352 * 0 + 1024 * 1024 / 1376) / 1376)
    assert scores["excluded"] == ["disc"]
    per_class = {c["name"]: c for c in scores["per_class"]}
    assert per_class["disc"]["iou"] is None and per_class["background"]["iou"] == 0.0
    assert [per_class[c]["gt_pixels"] for c in CLASSES] == [352, 1024, 0]
    assert [per_class[c]["pred_pixels"] for c in CLASSES] == [0, 1376, 0]
