"""``fcnseg evaluate``: JSON schema, original resolution, class exclusions, plots and user errors."""
import json

import pytest

from fcnseg.cli import main

from tiny_models import make_folder_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for one epoch on 3-class data whose images are 33 x 45 (odd sizes on purpose)."""
    tmp = tmp_path_factory.mktemp("eval")
    data = make_folder_dataset(tmp / "data", n_train=4, n_val=3, size=(33, 45))
    run = tmp / "run"
    assert main(["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "1",
                 "--batch-size", "2", "--crop-size", "32", "32", "--workers", "0", "--no-progress", "--no-plots",
                 "--out", str(run)]) == 0
    yield data, run, tmp


def _evaluate(data, checkpoint, *extra):
    return main(["evaluate", "--checkpoint", str(checkpoint), "--dataset", "folder", "--root", str(data),
                 "--split", "val", "--workers", "0", *extra])


def test_json_schema_and_original_resolution(trained, capsys):
    data, run, tmp = trained
    out = tmp / "scores.json"
    png = tmp / "confusion.png"
    # a checkpoint file works as well as the run directory
    assert _evaluate(data, run / "checkpoints" / "last.safetensors", "--json", str(out),
                     "--confusion-png", str(png)) == 0
    table = capsys.readouterr().out
    assert "pixel accuracy" in table and "background" in table
    s = json.loads(out.read_text())
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert 0.0 <= s[key] <= 1.0
    assert len(s["per_class"]) == 3 and len(s["confusion_matrix"]) == 3
    for c in s["per_class"]:
        assert set(c) >= {"name", "iou", "accuracy", "gt_pixels", "pred_pixels"}
        assert c["iou"] is None or 0.0 <= c["iou"] <= 1.0
    # every labelled pixel of the three 33x45 images (top row void) is scored: no resizing
    assert sum(c["gt_pixels"] for c in s["per_class"]) == 3 * 32 * 45
    assert sum(c["pred_pixels"] for c in s["per_class"]) == 3 * 32 * 45
    assert sum(map(sum, s["confusion_matrix"])) == 3 * 32 * 45
    assert png.is_file() and png.stat().st_size > 0


def test_exclusions(trained, tmp_path):
    data, run, _ = trained
    out = tmp_path / "s.json"
    assert _evaluate(data, run, "--exclude", "disc", "--json", str(out)) == 0
    s = json.loads(out.read_text())
    assert s["excluded"] == ["disc"] and [c["excluded"] for c in s["per_class"]] == [False, False, True]
    ious = [c["iou"] for c in s["per_class"][:2] if c["iou"] is not None]
    assert s["mean_iou"] == pytest.approx(sum(ious) / len(ious))
    assert _evaluate(data, run, "--exclude-absent", "--limit", "1", "--json", str(out)) == 0
    s = json.loads(out.read_text())
    assert s["images"] == 1
    assert s["excluded"] == [c["name"] for c in s["per_class"] if c["gt_pixels"] == 0]


def test_user_errors(trained, tmp_path, capsys):
    data, run, _ = trained
    assert _evaluate(data, run, "--exclude", "unicorn") == 1
    assert "not a class" in capsys.readouterr().err
    assert _evaluate(data, tmp_path / "nothing-here") == 1
    assert "no such checkpoint" in capsys.readouterr().err
    other = make_folder_dataset(tmp_path / "two", n_train=1, n_val=1)
    (other / "classes.txt").write_text("background\nsquare\ndisc\nsky\n")
    assert _evaluate(other, run) == 1
    assert "predicts 3 classes" in capsys.readouterr().err


def test_test_time_augmentation_is_scored_and_recorded(trained, tmp_path):
    data, run, _ = trained
    plain, aug = tmp_path / "plain.json", tmp_path / "aug.json"
    assert _evaluate(data, run, "--json", str(plain)) == 0
    assert _evaluate(data, run, "--flip", "--scales", "0.75", "1", "--json", str(aug)) == 0
    p, a = json.loads(plain.read_text()), json.loads(aug.read_text())
    assert p["tta"] == {"flip": False, "scales": [1.0]} and a["tta"] == {"flip": True, "scales": [0.75, 1.0]}
    assert sum(map(sum, a["confusion_matrix"])) == sum(map(sum, p["confusion_matrix"]))  # same pixels scored
    assert _evaluate(data, run, "--scales", "0") == 1


def test_an_exported_onnx_model_scores_like_its_checkpoint(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    data, run, _ = trained
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(onnx_path),
                 "--size", "33", "45"]) == 0
    scores = []
    for ckpt in (run, onnx_path):
        out = tmp_path / f"{ckpt.name}.json"
        assert _evaluate(data, ckpt, "--json", str(out), "--flip") == 0
        scores.append(json.loads(out.read_text()))
    a, b = scores
    # the same pixels scored the same way, up to the odd float32 tie
    moved = sum(abs(x - y) for ra, rb in zip(a["confusion_matrix"], b["confusion_matrix"]) for x, y in zip(ra, rb))
    assert moved <= 0.005 * 3 * 32 * 45 and b["checkpoint"].endswith("m.onnx")
    assert b["tta"] == {"flip": True, "scales": [1.0]}
    assert _evaluate(data, onnx_path, "--amp") == 1
