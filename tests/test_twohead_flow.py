"""The two-headed net end to end on a tiny SIFT-Flow-like folder: train one epoch from the shipped config,
evaluate (a table and scores per head, derived geometric labels marked), predict (one mask per head)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.data import build_dataset
from fcnseg.data.siftflow import DERIVED, GEOMETRIC_CLASSES, SIFTFLOW_CLASSES
from fcnseg.errors import FcnsegError
from fcnseg.record import CheckpointRecord

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "siftflow_fcn16s_efficientnet_lite0_twohead_cpu.yaml"
NAMES = ["a", "b", "c", "d"]


def _tiny_siftflow(root: Path, geolabels: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "labels") + (("geolabels",) if geolabels else ()):
        (root / sub).mkdir(parents=True)
    for n in NAMES:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{n}.jpg")
        Image.fromarray(rng.integers(0, 34, (40, 48), dtype=np.uint8)).save(root / "labels" / f"{n}.png")
        if geolabels:
            Image.fromarray(rng.integers(0, 4, (40, 48), dtype=np.uint8)).save(root / "geolabels" / f"{n}.png")
    (root / "trainval.txt").write_text("\n".join(NAMES) + "\n")  # 4: batches of 2, batch norm trains
    (root / "test.txt").write_text("d\n")
    return root


def test_both_label_maps_come_stacked_and_move_together(tmp_path):
    root = _tiny_siftflow(tmp_path / "sf")
    ds = build_dataset("siftflow", root, "trainval", labels="both")
    image, mask = ds[0]
    assert image.shape == (3, 40, 48) and mask.shape == (2, 40, 48) and mask.dtype == torch.int64
    assert list(ds.heads) == ["semantic", "geometric"] and ds.heads["geometric"]["classes"] == GEOMETRIC_CLASSES
    assert ds.label_source == {"semantic": "semantic label files", "geometric": DERIVED}
    # the channels are the semantic and the (derived) geometric label maps, pixel for pixel
    assert torch.equal(mask[0], build_dataset("siftflow", root, "trainval")[0][1])
    assert torch.equal(mask[1], build_dataset("siftflow", root, "trainval", labels="geometric")[0][1])
    # training transforms scale, crop, pad and flip both maps alike: channel 1 stays channel 0's derivation
    from fcnseg.data import build_transforms
    from fcnseg.data.siftflow import SIFTFLOW_GEOMETRY

    to_geometry = torch.tensor([GEOMETRIC_CLASSES.index(SIFTFLOW_GEOMETRY[c]) for c in SIFTFLOW_CLASSES])
    ds.transforms = build_transforms("siftflow", train=True, crop_size=(64, 64), scale_range=(0.8, 1.3), jitter=0)
    for i in range(3):
        _, crop = ds[i]
        void = crop[0] == 255
        assert crop.shape == (2, 64, 64) and torch.equal(void, crop[1] == 255)
        assert void.sum() >= 64 * 64 - 52 * 63  # the padding, on both maps (the image is at most 52 x 63)
        assert torch.equal(to_geometry[crop[0][~void]], crop[1][~void])


def test_geolabel_files_are_read_when_present(tmp_path):
    root = _tiny_siftflow(tmp_path / "sf", geolabels=True)
    ds = build_dataset("siftflow", root, "trainval", labels="both")
    assert ds.label_source["geometric"] == "geometric label files"
    raw = np.asarray(Image.open(root / "geolabels" / "a.png")).astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    assert np.array_equal(ds[0][1][1].numpy(), expected)
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(root / "geolabels" / "b.png")
    from fcnseg.data.io import DataFileError
    with pytest.raises(DataFileError, match="geometric label values \\[7\\]"):
        ds.load(1)


def test_the_record_lists_and_checks_every_head():
    model = fcnseg.build_model("fcn16s_efficientnet_lite0_twohead", num_classes=5, heads={"semantic": 5, "geo": 2})
    assert model.num_classes == 5 and model.build_kwargs == {"heads": {"semantic": 5, "geo": 2}}
    good = {"arch": model.arch, "num_classes": 5, "model_kwargs": model.build_kwargs,
            "classes": list("abcde"), "heads": {"semantic": {"classes": list("abcde")}, "geo": {"classes": ["x", "y"]}}}
    rec = CheckpointRecord.parse(good)
    assert list(rec.heads) == ["semantic", "geo"] and len(rec.heads["geo"]["colors"]) == 2
    for bad, match in [({"model_kwargs": {"heads": {"Semantic": 5}}}, "model_kwargs"),
                       ({"model_kwargs": {"heads": {f"h{'x' * i}": 2 for i in range(9)}}}, "model_kwargs"),
                       ({"model_kwargs": {"heads": {"semantic": 0}}}, "model_kwargs"),
                       ({"heads": {"geo": {"classes": ["x", "y"]}, "semantic": {"classes": list("abcde")}}}, "names"),
                       ({"heads": {"semantic": {"classes": list("abcde")}, "geo": {"classes": ["x"]}}}, "geo"),
                       ({"model_kwargs": {"heads": {"semantic": 5, "geo": 2}, "pretrained": True}}, "pretrained")]:
        with pytest.raises(FcnsegError, match=match):
            CheckpointRecord.parse({**good, **bad})
    with pytest.raises(FcnsegError, match="first head"):
        fcnseg.build_model("fcn16s_efficientnet_lite0_twohead", num_classes=7, heads={"semantic": 5})


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_train_evaluate_predict_with_two_heads(tmp_path, capsys):
    root = _tiny_siftflow(tmp_path / "sf")
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["model"] == "fcn16s_efficientnet_lite0_twohead" and cfg["dataset_kwargs"] == {"labels": "both"}
    # the shipped recipe, shrunk: no ImageNet weights, one tiny epoch, validation on the test list
    cfg.update(pretrained=False, amp=False, epochs=1, batch_size=2, crop_size=[32, 32], workers=0, threads=1, split="trainval",
               val_split="test", time_budget_min=0, warmup_steps=0, plots=False, progress=False,
               model_kwargs={"heads": {"semantic": 33, "geometric": 3}})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # head order matters
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--root", str(root), "--out", str(run)]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(row["val_heads"]) == {"semantic", "geometric"}
    assert row["val_heads"]["geometric"]["label_source"] == DERIVED
    assert row["val"]["mean_iou"] == row["val_heads"]["semantic"]["mean_iou"]  # `val` is the first head
    record = json.loads((run / "checkpoints" / "best.json").read_text())
    assert record["heads"]["geometric"]["classes"] == GEOMETRIC_CLASSES
    assert record["heads"]["semantic"]["classes"] == SIFTFLOW_CLASSES and record["num_classes"] == 33
    assert set(record["metrics"]["heads"]) == {"semantic", "geometric"}
    capsys.readouterr()

    out_json = tmp_path / "scores.json"
    assert main(["evaluate", "--checkpoint", str(run), "--json", str(out_json), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "head semantic (labels: semantic label files)" in printed and f"head geometric (labels: {DERIVED})" in printed
    scores = json.loads(out_json.read_text())
    assert scores["labels"]["geometric"] == DERIVED and scores["images"] == 1
    geo = scores["heads"]["geometric"]
    assert geo["num_pixels"] == scores["heads"]["semantic"]["num_pixels"] > 0  # derived: the same void pixels
    assert len(geo["per_class"]) == 3 and scores["mean_iou"] == scores["heads"]["semantic"]["mean_iou"]
    # the scores are those of the loaded model on the one test image, head by head
    model = fcnseg.load_checkpoint(run / "checkpoints" / "best.safetensors")
    ds = build_dataset("siftflow", root, "test", labels="both")
    x, mask = ds[0]
    with torch.no_grad():
        logits = model(x[None])
    for i, name in enumerate(["semantic", "geometric"]):
        valid = mask[i] != 255
        acc = (logits[name][0].argmax(0)[valid] == mask[i][valid]).float().mean().item()
        assert scores["heads"][name]["pixel_accuracy"] == pytest.approx(acc, abs=1e-6)
    with pytest.raises(FcnsegError, match="multi-head"):
        fcnseg.evaluate_checkpoint(run, flip=True)

    pred = tmp_path / "pred"
    photo = root / "images" / "d.jpg"
    assert main(["predict", str(photo), "--checkpoint", str(run), "--out", str(pred)]) == 0
    assert sorted(p.name for p in pred.iterdir()) == ["d_geometric.png", "d_semantic.png", "legend_geometric.png",
                                                      "legend_semantic.png"]
    for name in ["semantic", "geometric"]:
        png = Image.open(pred / f"d_{name}.png")
        assert png.mode == "P" and png.size == (48, 40)
    # nothing is replaced without --overwrite: the second run skips the image and says so
    assert main(["predict", str(photo), "--checkpoint", str(run), "--out", str(pred)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["predict", str(photo), "--checkpoint", str(run), "--out", str(tmp_path / "p2"), "--overlay"]) == 1
    assert "multi-head" in capsys.readouterr().err


def test_a_two_headed_net_needs_one_label_map_per_head(tmp_path):
    from fcnseg.config import from_dict
    from fcnseg.train import fit

    root = _tiny_siftflow(tmp_path / "sf")
    cfg = from_dict({"model": "fcn16s_efficientnet_lite0_twohead", "dataset": "siftflow", "root": str(root),
                     "split": "trainval", "val_split": "", "epochs": 1, "workers": 0, "out": str(tmp_path / "run"),
                     "model_kwargs": {"heads": {"semantic": 33, "geometric": 3}}, "progress": False})
    with pytest.raises(FcnsegError, match="one label map per head"):
        fit(cfg)


def test_single_output_paths_refuse_a_multihead_net_in_one_line(tmp_path):
    from fcnseg import Segmenter, build_model
    from fcnseg.errors import FcnsegError
    from fcnseg.weights.export import export_onnx

    model = build_model("fcn16s_efficientnet_lite0_twohead", num_classes=4).eval()
    for attempt in (lambda: Segmenter(model), lambda: export_onnx(model, tmp_path / "m.onnx")):
        with pytest.raises(FcnsegError, match=r"has heads \(semantic, geometric\).*fcnseg predict"):
            attempt()
