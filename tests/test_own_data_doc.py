"""docs/own-data.md is executed: every ``$ fcnseg ...`` line of its ``console`` blocks runs, in order, on tiny
labelme, COCO and CVAT exports this test writes (training gets ``--epochs 1 --crop-size 64 64``, as the page says;
the export line runs in the slow variant)."""
from __future__ import annotations

import base64
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-data.md"
# what the page says a quick run adds, plus what keeps a test quiet and single-process
TRAIN_EXTRA = ["--epochs", "1", "--crop-size", "64", "64", "--batch-size", "2", "--workers", "0", "--no-plots",
               "--no-progress"]
H, W = 48, 64


def doc_commands(text: str) -> list[list[str]]:
    """The ``$ `` lines of every ```console block, split like a shell would."""
    cmds = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        cmds += [shlex.split(line[2:]) for line in block.splitlines() if line.startswith("$ ")]
    return cmds


def scene(seed: int) -> tuple[np.ndarray, list[tuple[str, list[list[float]]]]]:
    """A tiny street: noisy sky, a grey road at the bottom, a red car; with its polygons."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (H, W, 3)).astype(np.uint8)
    img[:, :, 2] = 200  # bluish background
    y0 = 28 + seed % 5
    img[y0:] = (90, 90, 90)
    x0 = 8 + 5 * (seed % 6)
    img[y0 - 8:y0 + 6, x0:x0 + 16] = (220, 30, 30)
    road = [[0, y0], [W - 1, y0], [W - 1, H - 1], [0, H - 1]]
    car = [[x0, y0 - 8], [x0 + 15, y0 - 8], [x0 + 15, y0 + 5], [x0, y0 + 5]]
    return img, [("road", road), ("car", car)]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_exports(root: Path, n: int = 8) -> None:
    lm, coco, cvat = root / "labelme_export", root / "coco_export", root / "cvat_export"
    for d in (lm, coco / "images", coco / "annotations", cvat / "images", root / "photos", root / "unlabelled"):
        d.mkdir(parents=True)
    images, annotations, xml_images = [], [], []
    for i in range(n):
        img, shapes = scene(i)
        name = f"street{i}.png"
        doc = {"version": "5.4.1", "flags": {}, "imagePath": name, "imageHeight": H, "imageWidth": W,
               "imageData": None, "shapes": [{"label": lab, "points": pts, "group_id": None, "shape_type": "polygon",
                                              "flags": {}} for lab, pts in shapes]}
        if i % 2:  # half embed the image, as labelme does by default; half link it
            doc["imageData"] = base64.b64encode(png(img)).decode()
        else:
            (lm / name).write_bytes(png(img))
        (lm / f"street{i}.json").write_text(json.dumps(doc))
        (coco / "images" / name).write_bytes(png(img))
        (cvat / "images" / name).write_bytes(png(img))
        images.append({"id": i + 1, "file_name": name, "width": W, "height": H})
        polys = ""
        for j, (lab, pts) in enumerate(shapes):
            annotations.append({"id": 10 * i + j, "image_id": i + 1, "category_id": 1 if lab == "road" else 2,
                                "iscrowd": 0, "segmentation": [[v for p in pts for v in p]]})
            polys += (f'<polygon label="{lab}" source="manual" occluded="0" z_order="0" points="'
                      + ";".join(f"{x:.2f},{y:.2f}" for x, y in pts) + '"></polygon>')
        xml_images.append(f'<image id="{i}" name="{name}" width="{W}" height="{H}">{polys}</image>')
    (coco / "annotations" / "instances_default.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 1, "name": "road", "supercategory": ""},
                        {"id": 2, "name": "car", "supercategory": ""}]}))
    (cvat / "annotations.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><annotations><version>1.1</version><meta><task><labels>'
        "<label><name>road</name><color>#808080</color></label><label><name>car</name><color>#ff0000</color></label>"
        "</labels></task></meta>" + "".join(xml_images) + "</annotations>")
    for i in range(2):
        big = Image.fromarray(scene(20 + i)[0]).resize((W * 4, H * 4), Image.BILINEAR)
        big.save(root / "photos" / f"photo{i}.jpg", quality=95)
    for i in range(3):
        Image.fromarray(scene(30 + i)[0]).save(root / "unlabelled" / f"u{i}.png")


def test_the_page_lists_the_whole_path():
    cmds = doc_commands(DOC.read_text())
    steps = [c[1] if c[1] != "data" else f"data {c[2]}" for c in cmds]
    for step in ("data import", "data check", "train", "evaluate", "predict", "data rank", "export"):
        assert step in steps, step
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "docs/own-data.md" in readme


# the slowest test of the suite (minutes on 2 busy cores: importers, training, evaluation, prediction, ranking and the
# ONNX export): it runs in the slow group only, where it goes through the whole page, so it covers everything a
# shorter fast variant did; the fast suite keeps the page's command list (test_the_page_lists_the_whole_path) and
# the train line's defaults
@pytest.mark.slow
@pytest.mark.parametrize("full", [True], ids=["whole-page"])
def test_own_data_doc_runs(tmp_path, monkeypatch, capsys, full):
    write_exports(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in doc_commands(DOC.read_text()):
        assert argv[0] == "fcnseg", argv
        if argv[1] == "export" and not full:
            continue
        args = argv[1:] + (TRAIN_EXTRA if argv[1] == "train" else []) + (
            ["--no-progress"] if argv[1] == "evaluate" else [])
        code = main(args)
        out, err = capsys.readouterr()
        assert code == 0, f"{' '.join(argv)} exited {code}:\n{out}\n{err}"
        if argv[1] == "train":
            assert "best checkpoint: runs/mymodel/checkpoints/best.safetensors" in out
            assert "fcnseg evaluate --checkpoint" in out and "fcnseg predict" in out and "fcnseg export" in out
        if argv[1] == "evaluate":
            assert "on folder val" in out and "splits/val.txt" in out
    # what the page promises exists
    assert (tmp_path / "mydata" / "classes.txt").read_text().splitlines()[0].startswith("background ")
    for d in ("mydata", "mydata-coco", "mydata-cvat"):
        assert len(list((tmp_path / d / "masks").glob("*.png"))) == 8
    # the three tools' exports of the same polygons give the same labels where the tools' conventions agree
    a = np.asarray(Image.open(tmp_path / "mydata" / "masks" / "street3.png"))
    c = np.asarray(Image.open(tmp_path / "mydata-cvat" / "masks" / "street3.png"))
    assert np.array_equal(a, c)
    assert (tmp_path / "mydata" / "class_weights.json").is_file()
    for i in range(2):
        mask = Image.open(tmp_path / "masks" / f"photo{i}.png")
        assert mask.size == (W * 4, H * 4)
        assert Image.open(tmp_path / "masks" / f"photo{i}_uncertainty.png").mode == "L"
    assert (tmp_path / "to_label.csv").read_text().count("\n") == 4
    assert (tmp_path / "mymodel.onnx").is_file() == full

    # the library call behind 'fcnseg evaluate': the run directory gives dataset, root and split
    import fcnseg
    from fcnseg.errors import FcnsegError

    scores = fcnseg.evaluate_checkpoint(tmp_path / "runs" / "mymodel")
    assert (scores["dataset"], scores["split"], scores["images"]) == ("folder", "val", 1)
    assert len(scores["per_class"]) == 3
    cm = np.array(scores["confusion_matrix"], dtype=float)  # rows: ground truth
    with np.errstate(invalid="ignore"):
        iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert scores["mean_iou"] == pytest.approx(float(np.nanmean(iou)))
    assert scores["pixel_accuracy"] == pytest.approx(float(np.trace(cm) / cm.sum()))
    with pytest.raises(FcnsegError, match="give the dataset"):
        fcnseg.evaluate_checkpoint("camvid")


@pytest.mark.parametrize("line", ["$ fcnseg train --dataset folder --root mydata --out runs/mymodel"])
def test_the_train_line_uses_only_defaults(line):
    """The page's training command has no tuning flags: the defaults are the recipe."""
    assert line in DOC.read_text()
