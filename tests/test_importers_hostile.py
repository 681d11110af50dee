"""``fcnseg data import`` on hostile exports (issue 30, findings 1, 2, 3, 9, 10, 11 and 14): each finding
reproduced, then a fuzz of a few hundred crafted labelme, COCO and CVAT files run in a child process under an
address-space limit, each checked for exit status 1, exactly one line on stderr, no traceback and bounded memory."""
from __future__ import annotations

import base64
import io
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from fcnseg.cli import main
from fcnseg.data import build_dataset
from fcnseg.data.folder import read_classes_txt
from fcnseg.data.importers import import_annotations, label_problem, rle_runs, write_classes_txt
from fcnseg.data.io import DataFileError, read_image
from fcnseg.errors import FcnsegError

HERE = Path(__file__).resolve().parent
H, W = 48, 64
# a minimal Encapsulated PostScript file: Pillow recognises it and, unless told otherwise, runs Ghostscript on it
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n%%EndComments\n0 0 moveto 10 10 lineto stroke\n%%EOF\n"


def png_bytes(h: int = H, w: int = W, seed: int = 0, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels in its header and holds almost no data (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


def labelme(shapes, image_path="a.png", data=None, h=H, w=W) -> dict:
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
            "imageData": base64.b64encode(data).decode() if data else None, "imageHeight": h, "imageWidth": w}


def lm_shape(label, points, kind="polygon", **extra) -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}, **extra}


GOOD_LM = lm_shape("car", [[2, 2], [20, 2], [20, 20]])


def coco(annotations, categories=None, images=None) -> dict:
    return {"images": images if images is not None else [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
            "categories": categories if categories is not None else [{"id": 1, "name": "car"}],
            "annotations": annotations}


def coco_ann(seg, ann_id=2, image_id=1, category_id=1) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0, "segmentation": seg}


GOOD_COCO = coco_ann([[2, 2, 20, 2, 20, 20]], ann_id=1)


def cvat(inner: str, name: str = "a.png", width: str = str(W), height: str = str(H), labels: str = "") -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task><labels>{labels}'
            f'</labels></task></meta><image id="0" name="{name}" width="{width}" height="{height}">'
            f'<polygon label="car" points="2,2;20,2;20,20" z_order="0"/>{inner}</image></annotations>')


def xml_attr(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace("\n", "&#10;").replace(
        "\t", "&#9;")


def xml_cannot_hold(s: str) -> bool:
    """XML 1.0 has no way to write these control characters, not even as references: the file is refused whole."""
    return any(ord(c) < 32 and c not in "\t\n\r" for c in s)


# ---- finding 1: COCO coordinates that crashed pycocotools -----------------------------------------------

def run_child(cases: list[dict], tmp_path: Path, headroom_mb: int = 1024) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``{"name", "argv"}`` cases through ``fcnseg.cli.main`` in tests/importer_fuzz_child.py: its exit and
    one result row per case that finished (the first row is the start)."""
    cases_file, results_file = tmp_path / "cases.json", tmp_path / "results.jsonl"
    cases_file.write_text(json.dumps([{"name": c["name"], "argv": c["argv"]} for c in cases]))
    env = {**os.environ, "FUZZ_HEADROOM_MB": str(headroom_mb), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(HERE / "importer_fuzz_child.py"), str(cases_file), str(results_file)],
                          capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(ln) for ln in results_file.read_text().splitlines()] if results_file.exists() else []
    return proc, rows


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_finding1_huge_coco_coordinates_are_one_line_not_a_crash(tmp_path):
    """Before: 1e300 killed the process with SIGSEGV (exit 139, no message); 3e7 took 3.5 GB for a 64x48 image.
    Run in a child process (a crash there cannot take the test run with it) with 1 GiB of address space to spare."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    cases = []
    for value in (1e300, 3e7):
        src = tmp_path / f"c{value:g}.json"
        src.write_text(json.dumps(coco([GOOD_COCO, coco_ann([[0, 0, value, 0, value, value]])])))
        cases.append({"name": f"{value:g}", "argv": ["data", "import", "--from", "coco", str(src), "--out",
                                                      str(tmp_path / f"ds{value:g}")]})
    proc, rows = run_child(cases, tmp_path)
    assert proc.returncode == 0, f"child died (exit {proc.returncode}) after {len(rows) - 1} cases: " \
        f"{proc.stderr[-1000:]}"
    for value, row in zip((1e300, 3e7), rows[1:]):
        lines = row["stderr"].splitlines()
        assert row["code"] == 1 and row["escaped"] is None and len(lines) == 1, row
        assert (f"annotation 2 (image 1) 'car': has a point at ({value:.6g}, 0), further outside the 64x48 image "
                f"than its size") in lines[0]
        mask = np.asarray(Image.open(tmp_path / f"ds{value:g}" / "masks" / "a.png"))
        assert set(np.unique(mask)) == {0, 1} and mask[3, 18] == 1 and mask[18, 3] == 0  # only the good triangle


# ---- finding 2: RLE runs that do not cover the image -----------------------------------------------------

def test_finding2_short_rle_is_refused_and_no_uninitialised_pixels_are_written(tmp_path, capsys):
    """Before: counts summing to less than h*w imported with exit 0, the rest of the mask from uninitialised memory."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    src = tmp_path / "c.json"
    src.write_text(json.dumps(coco([coco_ann({"size": [H, W], "counts": [5, 10]})])))
    code, out, err = run_cli(["data", "import", "--from", "coco", str(src), "--out", str(tmp_path / "ds")], capsys)
    assert code == 1 and len(err) == 1
    assert err[0] == (f"fcnseg: {src}: annotation 2 (image 1) 'car': RLE runs cover 15 pixels, not the 48x64 image's "
                      f"3,072; left out")
    assert "0 shapes" in out
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ds" / "masks" / "a.png")), 0)


def test_rle_string_decoder_agrees_with_pycocotools(tmp_path):
    """The compressed-RLE reader that checks runs before pycocotools sees them reads pycocotools' own strings."""
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = rng.integers(1, 90, 2)
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if trial % 3 == 0:  # long runs exercise the multi-character and difference-coded numbers
            m = np.zeros((h, w), np.uint8)
            m[rng.integers(0, h):, rng.integers(0, w):] = 1
        enc = coco_mask.encode(np.asfortranarray(m))
        runs = rle_runs(enc["counts"].decode(), h * w + 1)
        assert runs is not None and sum(runs) == h * w and min(runs) >= 0
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
        np.testing.assert_array_equal(flat.reshape(w, h).T, m)  # column-major runs, zeros first
    assert rle_runs("garbage!!", 100) is None  # '!' is below the alphabet
    assert rle_runs("1" * 50, 10) is None  # more runs than the image has pixels
    assert rle_runs("o", 10) is None  # a number cut off after a continuation bit


# ---- finding 3: files outside the export -----------------------------------------------------------------

@pytest.fixture
def outside(tmp_path) -> Path:
    """An image outside the export folders (tmp/secret/outside.png) and the export folder tmp/export/."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "outside.png").write_bytes(png_bytes(seed=9))
    (tmp_path / "export" / "images").mkdir(parents=True)
    return tmp_path / "secret" / "outside.png"


def test_finding3_names_leading_outside_the_export_are_not_followed(tmp_path, outside, capsys):
    """Before: an absolute or '../' imagePath/file_name/name copied the outside file into OUT/images, exit 0."""
    exp = tmp_path / "export"
    cases = {
        "labelme_abs": ("labelme", "a.json", json.dumps(labelme([GOOD_LM], image_path=str(outside)))),
        "labelme_dotdot": ("labelme", "b.json", json.dumps(labelme([GOOD_LM], image_path="../secret/outside.png"))),
        "coco_abs": ("coco", "c.json", json.dumps(coco([GOOD_COCO], images=[
            {"id": 1, "file_name": str(outside), "width": W, "height": H}]))),
        "cvat_abs": ("cvat", "d.xml", cvat("", name=str(outside))),
    }
    for name, (fmt, fname, text) in cases.items():
        (exp / fname).write_text(text)
        code, out, err = run_cli(["data", "import", "--from", fmt, str(exp / fname), "--out", str(tmp_path / name)],
                                 capsys)
        assert code == 1 and len(err) == 1, (name, err)
        assert "not found in" in err[0] and "is followed only with --allow-outside" in err[0], (name, err)
        assert not (tmp_path / name / "images").exists()
    # with --allow-outside the user says the names are trusted: the same file is read and copied
    code, out, err = run_cli(["data", "import", "--from", "labelme", str(exp / "a.json"), "--out", str(tmp_path / "ok"),
                              "--allow-outside"], capsys)
    assert code == 0 and err == []
    assert (tmp_path / "ok" / "images" / "a.png").read_bytes() == outside.read_bytes()


def test_finding3_the_refusal_does_not_say_whether_the_outside_file_exists(tmp_path, outside, capsys):
    """Before: 'unreadable' for an existing non-image target, 'not found' for a missing one."""
    exp = tmp_path / "export"
    (tmp_path / "secret" / "notes.txt").write_text("private")
    lines = []
    for i, target in enumerate(["notes.txt", "no-such-file.txt"]):
        (exp / "a.json").write_text(json.dumps(labelme([GOOD_LM], image_path=f"../secret/{target}")))
        code, _, err = run_cli(["data", "import", "--from", "labelme", str(exp / "a.json"), "--out",
                                str(tmp_path / f"o{i}")], capsys)
        assert code == 1 and len(err) == 1
        lines.append(err[0].replace(target, "TARGET"))
    assert lines[0] == lines[1]


def test_finding3_a_link_inside_the_export_to_outside_is_not_followed(tmp_path, outside, capsys):
    exp = tmp_path / "export"
    (exp / "a.png").symlink_to(outside)
    (exp / "a.json").write_text(json.dumps(labelme([GOOD_LM])))
    code, _, err = run_cli(["data", "import", "--from", "labelme", str(exp / "a.json"), "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 1 and len(err) == 1 and "--allow-outside" in err[0]
    # an image folder that is itself a link (an export whose images live elsewhere) is fine: names stay inside it
    (tmp_path / "export2").mkdir()
    (tmp_path / "export2" / "images").symlink_to(tmp_path / "secret")
    (tmp_path / "export2" / "c.json").write_text(json.dumps(coco([GOOD_COCO], images=[
        {"id": 1, "file_name": "outside.png", "width": W, "height": H}])))
    code, _, err = run_cli(["data", "import", "--from", "coco", str(tmp_path / "export2" / "c.json"), "--out",
                            str(tmp_path / "o2")], capsys)
    assert code == 0 and err == []


# ---- finding 9: label names and classes.txt --------------------------------------------------------------

@pytest.mark.parametrize("label, why", [
    ("#sky", "starts with '#', which classes.txt reads as a comment"),
    ("sky\nline", "holds the control or space character U+000A"),
    ("ignore_value: 3", "starts with 'ignore_value:'"),
    ("\x1b[31mred\x1b[0m", "holds the control or space character U+001B"),
    ("two  spaces", "leading, trailing or doubled spaces"),
])
@pytest.mark.parametrize("fmt", ["labelme", "coco", "cvat"])
def test_finding9_labels_classes_txt_cannot_hold_are_refused_in_one_line(tmp_path, capsys, fmt, label, why):
    """Before: '#sky' read back as a comment (ids shifted), a newline or 'ignore_value: 3' gave a classes.txt the
    folder reader rejects, ANSI escapes were printed raw; exit 0 each time."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    if fmt == "labelme":
        src = tmp_path / "a.json"
        src.write_text(json.dumps(labelme([GOOD_LM, lm_shape(label, [[30, 30], [40, 30], [40, 40]])])))
    elif fmt == "coco":
        src = tmp_path / "c.json"
        src.write_text(json.dumps(coco([GOOD_COCO, coco_ann([[30, 30, 40, 30, 40, 40]], category_id=2)],
                                       categories=[{"id": 1, "name": "car"}, {"id": 2, "name": label}])))
    else:
        src = tmp_path / "annotations.xml"
        src.write_text(cvat(f'<polygon label="{xml_attr(label)}" points="30,30;40,30;40,40" z_order="0"/>'))
    code, out, err = run_cli(["data", "import", "--from", fmt, str(src), "--out", str(tmp_path / "ds")], capsys)
    if fmt == "cvat" and xml_cannot_hold(label):
        why = "not readable XML (not well-formed (invalid token)"
    assert code == 1 and len(err) == 1 and why in err[0] and err[0].startswith("fcnseg: error: "), err
    assert "\x1b" not in out + "\n".join(err)
    assert not (tmp_path / "ds").exists()


def test_finding9_empty_labels_are_left_out_and_void_is_drawn_as_ignored(tmp_path, capsys):
    """Before: an empty CVAT label gave a classes.txt the reader rejects; 'void' became a class that training then
    silently ignored (465 labelled pixels dropped)."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    src = tmp_path / "annotations.xml"
    src.write_text(cvat('<polygon label="" points="30,30;40,30;40,40" z_order="0"/>'
                        '<box label="void" xtl="40" ytl="0" xbr="49" ybr="9" z_order="1"/>'))
    code, out, err = run_cli(["data", "import", "--from", "cvat", str(src), "--out", str(tmp_path / "ds")], capsys)
    assert code == 1 and len(err) == 1 and "polygon 1 '': no label; left out" in err[0]
    assert "drawn as ignored pixels (mask value 255), not as a class: 1 shapes labelled 'void'" in out
    assert (tmp_path / "ds" / "classes.txt").read_text().splitlines()[1].startswith("car ")
    assert len((tmp_path / "ds" / "classes.txt").read_text().splitlines()) == 2
    mask = np.asarray(Image.open(tmp_path / "ds" / "masks" / "a.png"))
    assert (mask == 255).sum() == 100 and (mask[0:10, 40:50] == 255).all()
    ds = build_dataset("folder", tmp_path / "ds", "all")
    assert ds.classes == ["background", "car"]
    assert (np.asarray(ds.load(0)[1]) == 255).sum() == 100  # read back as ignored, not as a class


def test_finding9_background_and_classes_flags_are_checked_too(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(labelme([GOOD_LM], data=png_bytes())))
    with pytest.raises(FcnsegError, match="background name 'void' is read as 'ignored'"):
        import_annotations("labelme", tmp_path / "a.json", tmp_path / "ds", background="void")
    with pytest.raises(FcnsegError, match="class '#car' in --classes starts with '#'"):
        import_annotations("labelme", tmp_path / "a.json", tmp_path / "ds", classes=["#car"])
    with pytest.raises(FcnsegError, match="class 'car' is listed twice"):
        import_annotations("labelme", tmp_path / "a.json", tmp_path / "ds", classes=["car", "car"])


def test_finding9_names_that_pass_the_check_round_trip_through_classes_txt(tmp_path):
    """Property: whatever name the check lets through reads back from classes.txt exactly, in its line."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=6))
    def check(names):
        names = [n for n in dict.fromkeys(names) if label_problem(n) is None and n.lower() not in ("void", "ignore")]
        if not names:
            return
        path = tmp_path / "classes.txt"
        write_classes_txt(path, names, [[i, 2 * i % 256, 255 - i] for i in range(len(names))])
        read_names, colors = read_classes_txt(path)
        assert read_names == names
        assert colors == [[i, 2 * i % 256, 255 - i] for i in range(len(names))]

    check()
    for bad in ("", " x", "x ", "a  b", "#x", "a\tb", "a\u2028b", "a\xa0b", "ignore_value: 1", "x" * 201,
                "e\u0301\x00"):
        assert label_problem(bad) is not None, bad


# ---- finding 10: shapes that drew nothing or the wrong thing ----------------------------------------------

@pytest.mark.parametrize("case, shape, why", [
    ("rect_plus", lm_shape("x", [[0, 0], [1e300, 1e300]], "rectangle"), "has a point at (1e+300, 1e+300)"),
    ("rect_minus", lm_shape("x", [[-1e300, -1e300], [5, 5]], "rectangle"), "has a point at (-1e+300, -1e+300)"),
    ("circle_1e9", lm_shape("x", [[10, 10], [1e9, 10]], "circle"), "reaches (-1e+09, -1e+09)"),
    ("circle_1e6", lm_shape("x", [[10, 10], [1e6, 10]], "circle"), "reaches (-999980, -999980)"),
    ("string_points", lm_shape("x", ["12", "34", "56"]), "point '12' is not a pair of finite numbers"),
    ("outside_in_margin", lm_shape("x", [[-40, -40], [-30, -40], [-30, -30]]), "covers no pixel of the 64x48 image"),
])
def test_finding10_labelme_shapes_that_cannot_draw_are_left_out(tmp_path, capsys, case, shape, why):
    """Before: rectangles at +-1e300 and a circle of r=1e9 drew 0 pixels and counted as imported; ['12','34','56']
    was read as (1,2),(3,4),(5,6); a circle of r=1e6 cost 16 s in Pillow."""
    (tmp_path / "a.json").write_text(json.dumps(labelme([GOOD_LM, shape], data=png_bytes())))
    start = time.perf_counter()
    code, out, err = run_cli(["data", "import", "--from", "labelme", str(tmp_path / "a.json"), "--out",
                              str(tmp_path / "ds")], capsys)
    assert time.perf_counter() - start < 10
    assert code == 1 and len(err) == 1 and why in err[0] and err[0].endswith("; left out"), err
    assert "1 shapes" in out  # the good triangle only


@pytest.mark.parametrize("element, why", [
    ('<ellipse label="x" cx="10" cy="10" rx="1e9" ry="1e9" z_order="0"/>', "reaches (-1e+09, -1e+09)"),
    ('<box label="x" xtl="nan" ytl="0" xbr="5" ybr="5" z_order="0"/>', "has a point at (nan, 0)"),
    ('<polygon label="x" points="0,0;inf,0;5,5" z_order="0"/>', "has a point at (inf, 0)"),
    ('<polygon label="x" points="0,0;nan,nan;5,5" z_order="0"/>', "has a point at (nan, nan)"),
])
def test_finding10_cvat_nan_inf_and_huge_shapes_are_left_out(tmp_path, capsys, element, why):
    """Before: CVAT accepted NaN/inf points, an ellipse of r=1e9 and a box with xtl='nan' drew 0 pixels."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "annotations.xml").write_text(cvat(element))
    code, out, err = run_cli(["data", "import", "--from", "cvat", str(tmp_path / "annotations.xml"), "--out",
                              str(tmp_path / "ds")], capsys)
    assert code == 1 and len(err) == 1 and why in err[0], err


def test_a_polygon_with_more_points_than_the_cap_is_left_out(tmp_path):
    pts = [[10 + 5 * math.cos(t), 10 + 5 * math.sin(t)] for t in np.linspace(0, 6.28, 100_001)]
    (tmp_path / "a.json").write_text(json.dumps(labelme([GOOD_LM, lm_shape("x", pts)], data=png_bytes())))
    report = import_annotations("labelme", tmp_path / "a.json", tmp_path / "ds")
    assert report.problems == [f"{tmp_path / 'a.json'}: shape 1 'x' (polygon): 100,001 points; at most 100,000 a "
                               f"shape; left out"]


# ---- finding 11: tracebacks -------------------------------------------------------------------------------

def _coco_case(tmp_path: Path, doc: dict) -> list[str]:
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "c.json").write_text(json.dumps(doc))
    return ["data", "import", "--from", "coco", str(tmp_path / "c.json"), "--out", str(tmp_path / "ds")]


@pytest.mark.parametrize("doc, why", [
    (coco([GOOD_COCO], categories=[{"id": 1, "name": "car"}, {"id": [1], "name": "x"}]),
     "category 1 {'id': [1], 'name': 'x'} lacks a whole-number id or a name"),
    (coco([GOOD_COCO, coco_ann([[0, 0, 5, 0, 5, 5]], image_id=[1])]),
     "annotation 2 (image [1]): image_id and category_id must be whole numbers"),
    (coco([GOOD_COCO, coco_ann({"size": [H, W], "counts": 5})]), "RLE counts 5 is neither a list"),
    (coco([GOOD_COCO, coco_ann({"size": [H, W], "counts": [5, -10, 3000]})]), "RLE counts hold a negative run"),
    (coco([GOOD_COCO, coco_ann({"size": [H, W], "counts": [3000, 100]})]),
     "RLE runs cover 3,100 pixels, not the 48x64 image's 3,072"),
    (coco([GOOD_COCO, coco_ann({"size": [H, W], "counts": "garbage!!"})]),
     "RLE counts 'garbage!!' is not a compressed COCO RLE of a 48x64 mask"),
    (coco([GOOD_COCO, coco_ann({"size": 5, "counts": [3072]})]), "RLE size 5 is not the image's [48, 64]"),
])
def test_finding11_coco_ids_and_rle_give_one_line(tmp_path, capsys, doc, why):
    code, out, err = run_cli(_coco_case(tmp_path, doc), capsys)
    assert code == 1 and len(err) == 1 and why in err[0], err


@pytest.mark.parametrize("make, why", [
    (lambda: json.dumps(labelme([GOOD_LM], image_path=123)), "imagePath 123 is not a file name"),
    (lambda: json.dumps(labelme([GOOD_LM], image_path=["a.png"])), "imagePath ['a.png'] is not a file name"),
    (lambda: "[" * 200_000 + "]" * 200_000, "not readable JSON (nested too deeply)"),
    (lambda: json.dumps(labelme([GOOD_LM, lm_shape("x", [[0, 0], [9, 9]], "mask", mask=base64.b64encode(
        png_header_only(100_000, 100_000)).decode())])), "unreadable mask bitmap (Image size (10000000000 pixels)"),
    (lambda: json.dumps(labelme([GOOD_LM, lm_shape("x", [[0, 0], [9, 9]], "mask", mask=base64.b64encode(
        png_header_only(5000, 5000)).decode())])), "mask bitmap is 5000x5000, larger than the 64x48 image"),
    (lambda: json.dumps(labelme([GOOD_LM, lm_shape("x", [[0, 0], [9, 9]], "mask", mask=12345)])),
     "'mask' is not a base64-encoded image"),
])
def test_finding11_labelme_paths_depth_and_bitmaps_give_one_line(tmp_path, capsys, make, why):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.json").write_text(make())
    code, out, err = run_cli(["data", "import", "--from", "labelme", str(tmp_path / "a.json"), "--out",
                              str(tmp_path / "ds")], capsys)
    assert code == 1 and len(err) == 1 and why in err[0], err


def test_a_labelme_mask_bitmap_is_drawn_where_its_box_says(tmp_path):
    bits = np.zeros((4, 6), np.uint8)
    bits[1:3, 2:5] = 255
    buf = io.BytesIO()
    Image.fromarray(bits).save(buf, format="PNG")
    (tmp_path / "a.json").write_text(json.dumps(labelme([lm_shape("x", [[10, 20], [15, 23]], "mask", mask=base64.
                                                                  b64encode(buf.getvalue()).decode())],
                                                        data=png_bytes())))
    report = import_annotations("labelme", tmp_path / "a.json", tmp_path / "ds")
    assert report.problems == [] and report.shapes == 1
    want = np.zeros((H, W), np.uint8)
    want[21:23, 12:15] = 1
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ds" / "masks" / "a.png")), want)


# ---- finding 14: nothing handed to Ghostscript --------------------------------------------------------------

@pytest.fixture
def ghostscript(monkeypatch) -> list:
    """Pillow's call into Ghostscript, recorded (and made to look installed, as on a machine that has it)."""
    calls: list = []

    def fake(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    return calls


def test_finding14_eps_is_never_handed_to_ghostscript(tmp_path, capsys, ghostscript, tiny_ckpt):
    """Before: an EPS image (as a file, as labelme imageData, as a labelme mask bitmap) reached Ghostscript."""
    (tmp_path / "photo.png").write_bytes(EPS)
    with pytest.raises(DataFileError, match="not one of the formats fcnseg reads: PNG, JPEG, BMP, TIFF, WEBP, PPM"):
        read_image(tmp_path / "photo.png")
    docs = {"embedded": labelme([GOOD_LM], data=EPS),
            "bitmap": labelme([GOOD_LM, lm_shape("x", [[0, 0], [9, 9]], "mask",
                                                 mask=base64.b64encode(EPS).decode())], data=png_bytes())}
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        code, _, err = run_cli(["data", "import", "--from", "labelme", str(tmp_path / f"{name}.json"), "--out",
                                str(tmp_path / f"ds_{name}"), "--images", str(tmp_path)], capsys)
        assert code == 1 and len(err) == 1 and "not one of the formats fcnseg reads" in err[0], err
    code, _, err = run_cli(["predict", "--checkpoint", str(tiny_ckpt), str(tmp_path / "photo.png"), "--out",
                            str(tmp_path / "pred"), "--quiet"], capsys)
    assert code == 1 and any("not one of the formats fcnseg reads" in ln for ln in err), err
    assert ghostscript == []


# ---- the crafted-file fuzz -----------------------------------------------------------------------------------

COORDS = [1e300, -1e300, 3e7, 1e9, float("nan"), float("inf"), float("-inf"), "12", None, True, [1], {"x": 1},
          10 ** 400]
BAD_LABELS = ["#sky", "sky\nline", "\x1b[31mred\x1b[0m", "ignore_value: 3", "two  spaces", "x" * 300, "a\u2028b",
              "tab\tx", "nul\x00x", "bidi\u202ex"]


def _write_fuzz_files(root: Path) -> list[dict]:
    """Every crafted file and the command that imports it: ``{"name", "argv", "expect"}``, expect a piece of the
    one stderr line."""
    outside = root / "outside.png"
    outside.write_bytes(png_bytes(seed=3))
    lm, cc, cv = root / "lm", root / "coco", root / "cvat"
    for d in (lm, cc / "images", cv / "images"):
        d.mkdir(parents=True)
    for d in (lm, cc / "images", cv / "images"):
        (d / "a.png").write_bytes(png_bytes())
        (d / "eps.png").write_bytes(EPS)
        (d / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (lm / "a.eps").write_bytes(EPS)
    (lm / "loop.png").symlink_to(lm / "loop.png")
    cases: list[dict] = []

    def add(fmt: str, name: str, content: str | bytes, expect: str) -> None:
        folder, ext = {"labelme": (lm, "json"), "coco": (cc, "json"), "cvat": (cv, "xml")}[fmt]
        path = folder / f"{name}.{ext}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        out = root / "out" / f"{fmt}_{name}"
        cases.append({"name": f"{fmt}:{name}", "expect": expect,
                      "argv": ["data", "import", "--from", fmt, str(path), "--out", str(out)]})

    outside_msg = "is followed only with --allow-outside"
    # labelme: coordinates of every kind of shape
    for i, v in enumerate(COORDS):
        for kind, pts in (("polygon", [[0, 0], [v, 0], [10, 10]]), ("rectangle", [[0, 0], [v, v]]),
                          ("circle", [[10, 10], [v, 10]])):
            expect = "further outside" if isinstance(v, float) and math.isfinite(v) else "is not a pair of finite"
            add("labelme", f"{kind}_coord{i}", json.dumps(labelme([GOOD_LM, lm_shape("x", pts, kind)])), expect)
    shapes = {
        "points_string": (lm_shape("x", "12"), "points is not a list"),
        "points_strings": (lm_shape("x", ["12", "34", "56"]), "is not a pair of finite"),
        "points_triples": (lm_shape("x", [[1, 2, 3], [4, 5, 6], [7, 8, 9]]), "is not a pair of finite"),
        "points_dict": (lm_shape("x", {"a": 1}), "points is not a list"),
        "points_none": (lm_shape("x", None), "points is not a list"),
        "points_empty": (lm_shape("x", []), "a polygon needs 3 or more points, has 0"),
        "points_many": (lm_shape("x", [[1, 1]] * 100_001), "100,001 points; at most 100,000"),
        "label_int": (lm_shape(123, [[0, 0], [5, 0], [5, 5]]), "no label"),
        "label_list": (lm_shape(["a"], [[0, 0], [5, 0], [5, 5]]), "no label"),
        "label_empty": (lm_shape("", [[0, 0], [5, 0], [5, 5]]), "no label"),
        "label_space": (lm_shape(" ", [[0, 0], [5, 0], [5, 5]]), "no label"),
        "line": (lm_shape("x", [[0, 0], [5, 5]], "line"), "has no area"),
        "type_cuboid": (lm_shape("x", [[0, 0], [5, 5]], "cuboid"), "unsupported shape type"),
        "type_int": (lm_shape("x", [[0, 0], [5, 5]], 5), "unsupported shape type"),
        "rect_3pts": (lm_shape("x", [[0, 0], [5, 5], [6, 6]], "rectangle"), "unsupported shape type with 3"),
        "not_object": (5, "not an object"),
        "mask_int": (lm_shape("x", [[0, 0], [9, 9]], "mask", mask=12345), "'mask' is not a base64"),
        "mask_not_b64": (lm_shape("x", [[0, 0], [9, 9]], "mask", mask="!!not base64!!"), "'mask' is not base64"),
        "mask_garbage": (lm_shape("x", [[0, 0], [9, 9]], "mask", mask=base64.b64encode(b"garbage").decode()),
                         "unreadable mask bitmap"),
        "mask_eps": (lm_shape("x", [[0, 0], [9, 9]], "mask", mask=base64.b64encode(EPS).decode()),
                     "unreadable mask bitmap"),
        "mask_bomb": (lm_shape("x", [[0, 0], [9, 9]], "mask", mask=base64.b64encode(
            png_header_only(100_000, 100_000)).decode()), "unreadable mask bitmap"),
        "mask_big": (lm_shape("x", [[0, 0], [9, 9]], "mask", mask=base64.b64encode(
            png_header_only(5000, 5000)).decode()), "larger than the 64x48 image"),
        "mask_far": (lm_shape("x", [[1e6, 0], [1e6 + 9, 9]], "mask", mask=base64.b64encode(
            png_bytes(4, 4, mode="L")).decode()), "further outside"),
        "circle_outside": (lm_shape("x", [[-30, -30], [-25, -30]], "circle"), "covers no pixel"),
        "polygon_outside": (lm_shape("x", [[-40, -40], [-30, -40], [-30, -30]]), "covers no pixel"),
    }
    for name, (shape, expect) in shapes.items():
        add("labelme", name, json.dumps(labelme([GOOD_LM, shape])), expect)
    for i, label in enumerate(BAD_LABELS):
        add("labelme", f"label{i}", json.dumps(labelme([GOOD_LM, lm_shape(label, [[30, 30], [40, 30], [40, 40]])])),
            "fcnseg: error: label ")
    docs = {
        "path_int": (labelme([GOOD_LM], image_path=123), "is not a file name"),
        "path_list": (labelme([GOOD_LM], image_path=["a.png"]), "is not a file name"),
        "path_dict": (labelme([GOOD_LM], image_path={"a": 1}), "is not a file name"),
        "path_abs_missing": (labelme([GOOD_LM], image_path="/etc/hostname"), outside_msg),
        "path_abs_image": (labelme([GOOD_LM], image_path=str(outside)), outside_msg),
        "path_dotdot": (labelme([GOOD_LM], image_path="../outside.png"), outside_msg),
        "path_missing": (labelme([GOOD_LM], image_path="missing.png"), "not found in"),
        "path_loop": (labelme([GOOD_LM], image_path="loop.png"), "not found in"),
        "path_nul": (labelme([GOOD_LM], image_path="a\x00.png"), "not found in"),
        "path_eps_suffix": (labelme([GOOD_LM], image_path="a.eps"), "is not an image suffix"),
        "path_eps_bytes": (labelme([GOOD_LM], image_path="eps.png"), "not one of the formats fcnseg reads"),
        "path_bomb": (labelme([GOOD_LM], image_path="bomb.png"), "decompression-bomb"),
        "data_eps": (labelme([GOOD_LM], data=EPS), "not one of the formats fcnseg reads"),
        "data_bomb": (labelme([GOOD_LM], data=png_header_only(100_000, 100_000)), "decompression-bomb"),
        "data_not_b64": ({**labelme([GOOD_LM]), "imageData": "!!!"}, "imageData is not base64"),
        "data_int": ({**labelme([GOOD_LM]), "imageData": 12345}, "imageData is not base64"),
        "width_zero": (labelme([GOOD_LM], w=0), "is not two whole numbers"),
        "width_negative": (labelme([GOOD_LM], w=-1), "is not two whole numbers"),
        "width_huge": (labelme([GOOD_LM], w=1e9), "over Pillow's limit"),
        "width_string": (labelme([GOOD_LM], w="64"), "is not two whole numbers"),
        "width_bool": (labelme([GOOD_LM], w=True), "is not two whole numbers"),
        "width_fraction": (labelme([GOOD_LM], w=64.5), "is not two whole numbers"),
        "width_none": (labelme([GOOD_LM], w=None), "is not two whole numbers"),
        "width_bigint": (labelme([GOOD_LM], w=2 ** 70), "over Pillow's limit"),
        "width_wrong": (labelme([GOOD_LM], w=65), "image is 64x48 but the annotation says 65x48"),
        "too_many_shapes": (labelme([lm_shape("x", [[0, 0], [5, 5]], "rectangle")] * 10_001),
                            "10,001 shapes; at most 10,000"),
        "shapes_string": ({**labelme([]), "shapes": "x"}, "not a labelme file"),
        "top_list": ([1, 2, 3], "not a labelme file"),
    }
    for name, (doc, expect) in docs.items():
        add("labelme", name, json.dumps(doc), expect)
    raw = {"deep": ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
           "truncated": ('{"shapes": [', "not readable JSON"),
           "not_utf8": (b"\xff\xfe{}", "not readable JSON"), "empty": ("", "not readable JSON"),
           "nan_top": ("NaN", "not a labelme file")}
    for name, (text, expect) in raw.items():
        add("labelme", name, text, expect)

    # COCO: coordinates, polygons, RLE, ids, images
    for i, v in enumerate(COORDS):
        expect = "further outside" if isinstance(v, float) and math.isfinite(v) else "polygon "
        add("coco", f"coord{i}", json.dumps(coco([GOOD_COCO, coco_ann([[0, 0, v, 0, 10, 10]])])), expect)
    anns = {
        "poly_short": ([[0, 0, 1]], "is not a flat list of 3 or more"),
        "poly_odd": ([[0, 0, 10, 0, 10]], "is not a flat list of 3 or more"),
        "poly_strings": ([["0", "0", "9", "0", "9", "9"]], "not a finite number"),
        "poly_nested": ([[[0, 0], [9, 0], [9, 9]]], "is not a flat list of 3 or more"),
        "poly_not_list": ([5], "is not a flat list"),
        "poly_empty_inner": ([[]], "is not a flat list"),
        "poly_one_bad": ([[0, 0, 9, 0, 9, 9], "x"], "is not a flat list"),
        "poly_many": ([[1, 1] * 100_001], "over 100,000 points"),
        "seg_int": (5, "no polygon or RLE"),
        "seg_string": ("abc", "no polygon or RLE"),
        "seg_empty_dict": ({}, "no polygon or RLE"),
        "rle_int": ({"size": [H, W], "counts": 5}, "is neither a list"),
        "rle_none": ({"size": [H, W], "counts": None}, "is neither a list"),
        "rle_dict": ({"size": [H, W], "counts": {"a": 1}}, "is neither a list"),
        "rle_negative": ({"size": [H, W], "counts": [5, -10, 3077]}, "negative run length"),
        "rle_short": ({"size": [H, W], "counts": [5, 10]}, "RLE runs cover 15 pixels"),
        "rle_over": ({"size": [H, W], "counts": [3072, 1]}, "RLE runs cover 3,073 pixels"),
        "rle_float": ({"size": [H, W], "counts": [3072.0]}, "not a list of whole run lengths"),
        "rle_bool": ({"size": [H, W], "counts": [True] * 3072}, "not a list of whole run lengths"),
        "rle_too_many": ({"size": [H, W], "counts": [1] * 3074}, "not a list of whole run lengths"),
        "rle_garbage": ({"size": [H, W], "counts": "garbage!!"}, "is not a compressed COCO RLE"),
        "rle_empty_string": ({"size": [H, W], "counts": ""}, "RLE runs cover 0 pixels"),
        "rle_long_string": ({"size": [H, W], "counts": "1" * 100_000}, "is not a compressed COCO RLE"),
        "rle_cut_off": ({"size": [H, W], "counts": "o"}, "is not a compressed COCO RLE"),
        "rle_unicode": ({"size": [H, W], "counts": "\u00e9\u00e9"}, "is not a compressed COCO RLE"),
        "rle_size_int": ({"size": 5, "counts": [3072]}, "RLE size 5 is not"),
        "rle_size_short": ({"size": [H], "counts": [3072]}, "RLE size [48] is not"),
        "rle_size_swapped": ({"size": [W, H], "counts": [3072]}, "RLE size [64, 48] is not"),
        "rle_size_floats": ({"size": [48.0, 64.0], "counts": [3072]}, "is not the image's"),
        "rle_size_strings": ({"size": ["48", "64"], "counts": [3072]}, "is not the image's"),
        "rle_size_huge": ({"size": [100_000, 100_000], "counts": [10 ** 10]}, "is not the image's"),
    }
    for name, (seg, expect) in anns.items():
        add("coco", name, json.dumps(coco([GOOD_COCO, coco_ann(seg)])), expect)
    ids = {
        "image_id_list": (coco_ann([[0, 0, 5, 0, 5, 5]], image_id=[1]), "must be whole numbers"),
        "image_id_dict": (coco_ann([[0, 0, 5, 0, 5, 5]], image_id={"a": 1}), "must be whole numbers"),
        "image_id_bool": (coco_ann([[0, 0, 5, 0, 5, 5]], image_id=True), "must be whole numbers"),
        "image_id_float": (coco_ann([[0, 0, 5, 0, 5, 5]], image_id=1.5), "must be whole numbers"),
        "image_id_unknown": (coco_ann([[0, 0, 5, 0, 5, 5]], image_id=99), "no image with this id"),
        "category_id_list": (coco_ann([[0, 0, 5, 0, 5, 5]], category_id=[1]), "must be whole numbers"),
        "category_id_unknown": (coco_ann([[0, 0, 5, 0, 5, 5]], category_id=7), "is not in 'categories'"),
        "ann_not_object": ("x", "not an object"),
    }
    for name, (ann, expect) in ids.items():
        add("coco", name, json.dumps(coco([GOOD_COCO, ann])), expect)
    for i, label in enumerate(BAD_LABELS + ["", " "]):
        add("coco", f"label{i}", json.dumps(coco([GOOD_COCO, coco_ann([[30, 30, 40, 30, 40, 40]], category_id=2)],
                                                 categories=[{"id": 1, "name": "car"}, {"id": 2, "name": label}])),
            "fcnseg: error: label ")
    good_image = {"id": 1, "file_name": "a.png", "width": W, "height": H}
    extra_images = {
        "img_id_list": ({"id": [1], "file_name": "b.png", "width": W, "height": H}, "lacks an id or a file_name"),
        "img_name_int": ({"id": 2, "file_name": 5, "width": W, "height": H}, "lacks an id or a file_name"),
        "img_not_object": ("x", "lacks an id or a file_name"),
        "img_abs": ({"id": 2, "file_name": "/etc/hostname", "width": W, "height": H}, outside_msg),
        "img_abs_image": ({"id": 2, "file_name": str(outside), "width": W, "height": H}, outside_msg),
        "img_dotdot": ({"id": 2, "file_name": "../../outside.png", "width": W, "height": H}, outside_msg),
        "img_width_string": ({"id": 2, "file_name": "a.png", "width": "64", "height": H}, "is not two whole numbers"),
        "img_width_zero": ({"id": 2, "file_name": "a.png", "width": 0, "height": H}, "is not two whole numbers"),
        "img_width_huge": ({"id": 2, "file_name": "a.png", "width": 1e9, "height": 1e9}, "over Pillow's limit"),
        "img_eps": ({"id": 2, "file_name": "eps.png", "width": W, "height": H}, "not one of the formats fcnseg reads"),
        "img_bomb": ({"id": 2, "file_name": "bomb.png", "width": W, "height": H}, "decompression-bomb"),
    }
    for name, (image, expect) in extra_images.items():
        add("coco", name, json.dumps(coco([GOOD_COCO], images=[good_image, image])), expect)
    cats = {
        "cat_id_list": ({"id": [1], "name": "x"}, "lacks a whole-number id or a name"),
        "cat_name_int": ({"id": 2, "name": 5}, "lacks a whole-number id or a name"),
        "cat_twice": ({"id": 1, "name": "other"}, "is listed twice"),
        "cat_not_object": (7, "lacks a whole-number id or a name"),
    }
    for name, (cat, expect) in cats.items():
        add("coco", name, json.dumps(coco([GOOD_COCO], categories=[{"id": 1, "name": "car"}, cat])), expect)
    for name, (text, expect) in {"deep": ("{\"a\":" * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
                                 "no_lists": (json.dumps({"images": 5}), "not a COCO instances file"),
                                 "top_list": ("[]", "not a COCO instances file"),
                                 "truncated": ('{"images": [', "not readable JSON")}.items():
        add("coco", name, text, expect)

    # CVAT: coordinate strings in every shape, labels, images, documents
    strings = ["1e300", "-1e300", "3e7", "1e9", "nan", "inf", "-inf", "abc", "", "0x10"]
    for i, s in enumerate(strings):
        number = s not in ("abc", "", "0x10")
        for kind, el in (("polygon", f'<polygon label="x" points="0,0;{s},0;10,10" z_order="0"/>'),
                         ("box", f'<box label="x" xtl="{s}" ytl="0" xbr="10" ybr="10" z_order="0"/>'),
                         ("ellipse", f'<ellipse label="x" cx="10" cy="10" rx="{s}" ry="5" z_order="0"/>')):
            expect = "outside the 64x48" if number and s not in ("nan", "inf", "-inf") else \
                "has a point at (" if kind != "ellipse" and number else "reaches (" if number else "malformed"
            add("cvat", f"{kind}_coord{i}", cvat(el), expect)
    elements = {
        "poly_triples": ('<polygon label="x" points="1,2,3;4,5,6;7,8,9" z_order="0"/>', "needs 3 or more x,y"),
        "poly_singles": ('<polygon label="x" points="1;2;3" z_order="0"/>', "needs 3 or more x,y"),
        "poly_many": ('<polygon label="x" points="' + ";".join(["1,1"] * 100_001) + '" z_order="0"/>',
                      "100,001 points"),
        "box_rotated": ('<box label="x" xtl="0" ytl="0" xbr="5" ybr="5" rotation="45" z_order="0"/>',
                        "rotated boxes"),
        "box_no_coords": ('<box label="x" z_order="0"/>', "malformed"),
        "z_order_text": ('<box label="x" xtl="0" ytl="0" xbr="5" ybr="5" z_order="top"/>', "malformed"),
        "mask": ('<mask label="x" rle="1, 2" left="0" top="0" width="1" height="3" z_order="0"/>', "not supported"),
        "polyline": ('<polyline label="x" points="0,0;5,5" z_order="0"/>', "has no area"),
        "label_empty": ('<polygon label="" points="30,30;40,30;40,40" z_order="0"/>', "no label"),
        "ellipse_outside": ('<ellipse label="x" cx="-30" cy="-30" rx="3" ry="3" z_order="0"/>', "covers no pixel"),
    }
    for name, (el, expect) in elements.items():
        add("cvat", name, cvat(el), expect)
    for i, label in enumerate(BAD_LABELS):
        add("cvat", f"label{i}", cvat(f'<polygon label="{xml_attr(label)}" points="30,30;40,30;40,40" z_order="0"/>'),
            "not readable XML" if xml_cannot_hold(label) else "fcnseg: error: label ")
    images = {
        "img_abs": (cvat("", name="/etc/hostname"), outside_msg),
        "img_abs_image": (cvat("", name=str(outside)), outside_msg),
        "img_dotdot": (cvat("", name="../../outside.png"), outside_msg),
        "img_missing": (cvat("", name="missing.png"), "not found in"),
        "img_width_text": (cvat("", width="wide"), "is not two whole numbers"),
        "img_width_zero": (cvat("", width="0"), "is not two whole numbers"),
        "img_width_huge": (cvat("", width="1000000000", height="1000000000"), "over Pillow's limit"),
        "img_eps": (cvat("", name="eps.png"), "not one of the formats fcnseg reads"),
        "img_bomb": (cvat("", name="bomb.png"), "decompression-bomb"),
        "img_size_wrong": (cvat("", width="65"), "image is 64x48 but the annotation says 65x48"),
    }
    for name, (text, expect) in images.items():
        add("cvat", name, text, expect)
    documents = {
        "entities": ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b "bbbb">]><annotations/>', "DOCTYPE/ENTITY"),
        "not_xml": ("not xml at all", "not readable XML"),
        "nul": ("<annotations>\x00</annotations>", "not readable XML"),
        "wrong_root": ("<foo/>", "not a 'CVAT for images' export"),
        "deep": ("<annotations>" + "<a>" * 50_000 + "</a>" * 50_000 + "</annotations>", "no image could be"),
        "video": ("<annotations><track id='0' label='x'/></annotations>", "video exports hold"),
        "empty": ("", "not readable XML"),
    }
    for name, (text, expect) in documents.items():
        add("cvat", name, text, expect)
    return cases


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_fuzz_crafted_importer_files_one_line_each_bounded_memory(tmp_path):
    """A few hundred crafted labelme, COCO and CVAT files, each imported by the CLI in one child process under an
    address-space limit of 1 GiB above its imports: exit 1, exactly one line on stderr (the problem), no traceback,
    no raw escape character, under 30 s a file, and the child's peak resident size at most 600 MB above what it
    started with."""
    cases = _write_fuzz_files(tmp_path)
    assert len(cases) >= 150
    proc, rows = run_child(cases, tmp_path)
    start, results = rows[0], {r["name"]: r for r in rows[1:]}
    if proc.returncode != 0:
        crashed = cases[len(rows) - 1]["name"] if len(rows) - 1 < len(cases) else "?"
        pytest.fail(f"the fuzz child died (exit {proc.returncode}) in case {crashed}: {proc.stderr[-1500:]}")
    failures = []
    for case in cases:
        r = results[case["name"]]
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        ok = (r["code"] == 1 and r["escaped"] is None and len(lines) == 1 and lines[0].startswith("fcnseg: ")
              and case["expect"] in lines[0] and "Traceback" not in r["stderr"]
              and "\x1b" not in r["stderr"] + r["stdout"] and r["seconds"] < 30)
        if not ok:
            failures.append(f"{case['name']}: code {r['code']}, escaped {r['escaped']}, {r['seconds']:.1f} s, "
                            f"stderr {r['stderr'][-400:]!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:20])
    grown_mb = (max(r["maxrss_kb"] for r in rows) - start["maxrss_kb"]) / 1024
    assert grown_mb < 600, f"peak resident size grew by {grown_mb:.0f} MB"
