"""``fcnseg data import``: small labelme, COCO and CVAT exports in each tool's real format, masks checked pixel
by pixel."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.data import build_dataset
from fcnseg.data.importers import import_annotations
from fcnseg.errors import FcnsegError

H, W = 8, 10


def png_bytes(h: int = H, w: int = W, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read_ids(path: Path) -> np.ndarray:
    im = Image.open(path)
    assert im.mode == "P"  # palette PNG: ids that also look right in an image viewer
    return np.asarray(im)


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Bool mask with rows y0..y1-1, columns x0..x1-1 set."""
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ---- labelme --------------------------------------------------------------------------------------------

def labelme_doc(shapes, image_path="a.png", data: bytes | None = None, h=H, w=W) -> dict:
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
            "imageData": base64.b64encode(data).decode() if data else None, "imageHeight": h, "imageWidth": w}


def shape(label, points, kind="polygon"):
    return {"label": label, "points": points, "group_id": None, "description": "", "shape_type": kind, "flags": {}}


def test_labelme_polygons_rectangles_embedded_and_linked_images(tmp_path):
    src = tmp_path / "labelme"
    src.mkdir()
    # embedded image (imageData), a polygon then a rectangle drawn over part of it
    (src / "a.json").write_text(json.dumps(labelme_doc(
        [shape("road", [[0, 4], [9, 4], [9, 7], [0, 7]]), shape("car", [[2, 5], [4, 6]], "rectangle")],
        image_path="a.jpg", data=png_bytes(seed=1))))
    # linked image (imagePath) beside the JSON; a line cannot be converted and is reported
    (src / "b.png").write_bytes(png_bytes(seed=2))
    (src / "b.json").write_text(json.dumps(labelme_doc(
        [shape("sky", [[0, 0], [9, 0], [9, 2], [0, 2]]), shape("sky", [[0, 3], [5, 3]], "line")], image_path="b.png")))
    out = tmp_path / "ds"
    report = import_annotations("labelme", src, out)
    assert report.classes == ["background", "car", "road", "sky"]
    assert report.images == 2 and report.shapes == 3
    assert len(report.problems) == 1 and "b.json: shape 1 'sky' (line): a line has no area" in report.problems[0]

    a = read_ids(out / "masks" / "a.png")
    want = np.zeros((H, W), np.uint8)
    want[box(H, W, 4, 8, 0, 10)] = 2  # Pillow fills the polygon's boundary pixels too, as labelme does
    want[box(H, W, 5, 7, 2, 5)] = 1
    np.testing.assert_array_equal(a, want)
    b = read_ids(out / "masks" / "b.png")
    want = np.zeros((H, W), np.uint8)
    want[box(H, W, 0, 3, 0, 10)] = 3
    np.testing.assert_array_equal(b, want)
    # the embedded image was written out byte for byte; the linked one copied
    assert (out / "images" / "a.jpg").read_bytes() == png_bytes(seed=1)
    assert (out / "images" / "b.png").read_bytes() == png_bytes(seed=2)
    lines = (out / "classes.txt").read_text().splitlines()
    assert lines[0].startswith("background ") and len(lines) == 4 and all(len(ln.split()) == 4 for ln in lines)
    listed = [(out / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val")]
    assert sorted(listed[0] + listed[1]) == ["a", "b"]
    # the result is a folder dataset that reads back with the same ids
    ds = build_dataset("folder", out, "all")
    assert ds.classes == ["background", "car", "road", "sky"]
    np.testing.assert_array_equal(np.asarray(ds.load(ds.names.index("a"))[1]), a)


def test_labelme_unlabelled_as_ignore_and_class_order(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps(labelme_doc([shape("x", [[0, 0], [3, 0], [3, 3], [0, 3]]),
                                           shape("other", [[5, 5], [7, 7]], "rectangle")], data=png_bytes())))
    report = import_annotations("labelme", src, tmp_path / "ds", unlabelled="ignore", classes=["x"])
    assert report.classes == ["background", "x"]
    assert any("label 'other' is not in the class list" in p for p in report.problems)
    m = read_ids(tmp_path / "ds" / "masks" / "a.png")
    want = np.full((H, W), 255, np.uint8)
    want[box(H, W, 0, 4, 0, 4)] = 1
    np.testing.assert_array_equal(m, want)


def test_import_refuses_a_non_empty_out_and_a_size_mismatch(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps(labelme_doc([shape("x", [[0, 0], [3, 0], [3, 3]])], data=png_bytes(), h=H + 1)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FcnsegError, match="already exists and is not an empty folder"):
        import_annotations("labelme", src, tmp_path / "full")
    with pytest.raises(FcnsegError, match=r"image is 10x8 but the annotation says 10x9"):
        import_annotations("labelme", src, tmp_path / "ds")
    assert not (tmp_path / "ds" / "classes.txt").exists()


# ---- COCO -----------------------------------------------------------------------------------------------

def test_coco_polygons_and_both_rle_forms(tmp_path):
    from pycocotools import mask as coco_mask

    (tmp_path / "images").mkdir()
    for i in range(2):
        (tmp_path / "images" / f"img{i}.png").write_bytes(png_bytes(seed=i))
    (tmp_path / "images" / "img2.png").write_bytes(png_bytes(4, 5))
    blob = box(H, W, 2, 6, 3, 8)
    compressed = coco_mask.encode(np.asfortranarray(blob.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()  # JSON holds it as a string
    # uncompressed counts are column-major runs starting with zeros: columns 0-1 and row 0 of column 2 empty,
    # then rows 1-2 of columns 2-3
    uncompressed = {"size": [4, 5], "counts": [9, 2, 2, 2, 5]}
    doc = {
        "info": {}, "licenses": [],
        "images": [{"id": 1, "file_name": "img0.png", "width": W, "height": H},
                   {"id": 2, "file_name": "img1.png", "width": W, "height": H},
                   {"id": 3, "file_name": "img2.png", "width": 5, "height": 4}],
        "categories": [{"id": 7, "name": "cat", "supercategory": ""}, {"id": 9, "name": "dog", "supercategory": ""}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 12, "bbox": [1, 1, 3, 2],
             "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
            {"id": 2, "image_id": 2, "category_id": 9, "iscrowd": 1, "area": 20, "bbox": [3, 2, 5, 4],
             "segmentation": compressed},
            {"id": 3, "image_id": 2, "category_id": 7, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1],
             "segmentation": [[0, 0, 1]]},
            {"id": 4, "image_id": 3, "category_id": 9, "iscrowd": 1, "area": 4, "bbox": [2, 1, 2, 2],
             "segmentation": uncompressed},
        ]}
    src = tmp_path / "instances.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "ds"
    report = import_annotations("coco", src, out)
    assert report.classes == ["background", "cat", "dog"] and report.images == 3 and report.shapes == 3
    assert len(report.problems) == 1 and "annotation 3 (image 2) 'cat'" in report.problems[0]

    want = np.zeros((H, W), np.uint8)
    want[box(H, W, 1, 3, 1, 4)] = 1  # pycocotools' rasterisation of the 3x2 polygon (COCO's own convention)
    np.testing.assert_array_equal(read_ids(out / "masks" / "img0.png"), want)
    want = np.where(blob, 2, 0).astype(np.uint8)
    np.testing.assert_array_equal(read_ids(out / "masks" / "img1.png"), want)
    want = np.zeros((4, 5), np.uint8)
    want[box(4, 5, 1, 3, 2, 4)] = 2
    np.testing.assert_array_equal(read_ids(out / "masks" / "img2.png"), want)


def test_coco_cli_reports_every_left_out_annotation_in_one_line(tmp_path, capsys):
    (tmp_path / "img0.png").write_bytes(png_bytes())
    doc = {"images": [{"id": 1, "file_name": "img0.png", "width": W, "height": H}],
           "categories": [{"id": 1, "name": "cat"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]},
                           {"id": 2, "image_id": 1, "category_id": 5, "segmentation": [[0, 0, 5, 0, 5, 5]]},
                           {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    code = main(["data", "import", "--from", "coco", str(tmp_path / "c.json"), "--out", str(tmp_path / "ds")])
    out, err = capsys.readouterr()
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln]
    assert len(lines) == 2 and all(ln.startswith("fcnseg: ") for ln in lines)
    assert "category 5 is not in 'categories'" in lines[0] and "a box alone has no mask" in lines[1]
    assert "imported 1 images, 1 shapes, 2 classes" in out and "2 left out" in out


# ---- CVAT -----------------------------------------------------------------------------------------------

CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>1</id><name>demo</name><size>1</size><mode>annotation</mode>
      <labels>
        <label><name>road</name><color>#804080</color><type>any</type><attributes></attributes></label>
        <label><name>car</name><color>#400080</color><type>any</type><attributes></attributes></label>
      </labels>
    </task>
  </meta>
  <image id="0" name="frame_000000.png" width="10" height="8">
    <box label="car" source="manual" occluded="0" xtl="2.00" ytl="5.00" xbr="4.00" ybr="6.00" z_order="1"></box>
    <polygon label="road" source="manual" occluded="0" points="0.00,4.00;9.00,4.00;9.00,7.00;0.00,7.00" z_order="0">
    </polygon>
    <polyline label="road" source="manual" occluded="0" points="0.00,0.00;9.00,0.00" z_order="0"></polyline>
  </image>
</annotations>
"""


def test_cvat_polygons_boxes_z_order_and_colours(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "frame_000000.png").write_bytes(png_bytes())
    (tmp_path / "annotations.xml").write_text(CVAT_XML)
    out = tmp_path / "ds"
    report = import_annotations("cvat", tmp_path, out)  # the unpacked export folder
    assert report.classes == ["background", "car", "road"] and report.shapes == 2
    assert len(report.problems) == 1 and "polyline" in report.problems[0] and "has no area" in report.problems[0]
    want = np.zeros((H, W), np.uint8)
    want[box(H, W, 4, 8, 0, 10)] = 2
    want[box(H, W, 5, 7, 2, 5)] = 1  # the box has the higher z_order although it comes first
    np.testing.assert_array_equal(read_ids(out / "masks" / "frame_000000.png"), want)
    lines = (out / "classes.txt").read_text().splitlines()
    assert lines[1] == "car 64 0 128" and lines[2] == "road 128 64 128"  # the colours CVAT gave


def test_cvat_refuses_entities(tmp_path):
    (tmp_path / "a.xml").write_text('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><annotations/>')
    with pytest.raises(FcnsegError, match="DOCTYPE/ENTITY"):
        import_annotations("cvat", tmp_path / "a.xml", tmp_path / "ds")


def test_coco_missing_images_are_reported_once_and_unknown_ids_each(tmp_path):
    (tmp_path / "there.png").write_bytes(png_bytes())
    poly = [[0, 0, 5, 0, 5, 5]]
    doc = {"images": [{"id": 1, "file_name": "there.png", "width": W, "height": H},
                      {"id": 2, "file_name": "gone.png", "width": W, "height": H}],
           "categories": [{"id": 1, "name": "cat"}],
           "annotations": [{"id": i, "image_id": img, "category_id": 1, "segmentation": poly}
                           for i, img in ((1, 1), (2, 2), (3, 2), (4, 99))]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    report = import_annotations("coco", tmp_path / "c.json", tmp_path / "ds")
    assert report.images == 1 and report.shapes == 1
    assert len(report.problems) == 2
    assert "image 'gone.png' not found" in report.problems[0]
    assert "annotation 4 (image 99): no image with this id" in report.problems[1]
