"""The trained models shipped inside the package: present, self-describing, loadable by name."""
import hashlib
import json

import pytest
import torch

import fcnseg
from fcnseg.weights.checkpoint import builtin_checkpoints, read_record

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]


@pytest.mark.parametrize("name, num_classes, dataset", [("camvid", 11, "camvid"), ("siftflow", 33, "siftflow")])
def test_builtin_record_and_load(name, num_classes, dataset):
    path = builtin_checkpoints()[name]
    assert path.stat().st_size < 12e6  # stored compactly (float16)
    record = read_record(path)
    assert record["num_classes"] == num_classes and len(record["classes"]) == num_classes
    assert len(record["colors"]) == num_classes
    assert set(record["normalization"]) == {"mean", "std"}
    assert record["provenance"]["dataset"] == dataset
    assert "fcnseg train" in record["provenance"]["command"]
    assert record["provenance"]["wall_time_s"] > 0
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert 0.0 < record["metrics"][key] <= 1.0
    assert "fcnseg evaluate" in record["metrics"]["command"]
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # the record describes this very file

    model = fcnseg.load_checkpoint(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 37, 53))
    assert out.shape == (1, num_classes, 37, 53) and torch.isfinite(out).all()


def test_camvid_classes_and_ids():
    record = fcnseg.load_checkpoint("camvid").record
    assert record["classes"] == CAMVID_CLASSES
    assert record["colors"][0] == [128, 128, 128] and record["colors"][3] == [128, 64, 128]


def test_camvid_model_segments_a_synthetic_street():
    """Sky-grey above, road-purple below: the trained model should say sky on top and road at the bottom."""
    model = fcnseg.load_checkpoint("camvid")
    mean = torch.tensor(model.record["normalization"]["mean"])[:, None, None]
    std = torch.tensor(model.record["normalization"]["std"])[:, None, None]
    img = torch.empty(3, 360, 480)
    img[:, :150] = torch.tensor([0.75, 0.78, 0.82])[:, None, None]  # overcast sky
    img[:, 150:] = torch.tensor([0.35, 0.33, 0.36])[:, None, None]  # asphalt
    with torch.no_grad():
        pred = model(((img - mean) / std)[None]).argmax(1)[0]
    assert (pred[:60] == CAMVID_CLASSES.index("Sky")).float().mean() > 0.5
    assert (pred[-60:] == CAMVID_CLASSES.index("Road")).float().mean() > 0.5
