"""Labelling-tool exports (labelme, COCO, CVAT for images) turned into a folder dataset.

Every tool's file is parsed into the same plain description (an image and its labelled shapes),
every shape is checked against its image (numbers that are numbers, finite and near the image,
bounded vertex counts, RLE runs that cover the image exactly) before anything is drawn, then one
writer rasterises the shapes in file order (later shapes cover earlier ones) and writes
``images/``, ``masks/`` (palette PNGs of class ids), ``classes.txt`` (``name R G B``) and
``splits/{train,val}.txt``. Geometry comes from libraries, not from hand-written rasterisers:
Pillow's ``ImageDraw`` for labelme and CVAT polygons, boxes and ellipses (labelme draws its own
masks with it, so the pixels match the tool), and ``pycocotools`` for COCO polygons and RLE (the
rasterisation COCO's own tools define). A shape that cannot be converted is reported in one line
and left out; the rest of its image is kept. Image files are read only from the folders the export
is looked up in (``allow_outside`` lifts that), and only in the formats of ``io.READABLE_FORMATS``.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import reprlib
import shutil
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from ..files import atomic_write
from ..record import default_palette
from ..errors import FcnsegError
from .base import IGNORE_INDEX, holdout_split
from .folder import IGNORE_NAMES
from .io import IMAGE_SUFFIXES, READABLE_FORMATS, DataFileError, read_image

FORMATS = ("labelme", "coco", "cvat")

# Bounds on the work one file can ask for: past them a shape or image is one line, not minutes or gigabytes.
MAX_POINTS = 100_000  # vertices of one shape (COCO's most detailed polygons have a few thousand)
MAX_SHAPES = 10_000  # shapes on one image
MAX_LABEL = 200  # characters in a label name
# A vertex may lie outside the image (tools let one be dragged past the edge), by at most the image's
# larger side; that also bounds what a circle or ellipse costs to draw to a few times the image.

_brief = reprlib.Repr()  # quoted input in messages stays short, however long the input
_brief.maxstring, _brief.maxother, _brief.maxlist, _brief.maxdict, _brief.maxlevel = 40, 40, 4, 3, 2


def brief(value: Any) -> str:
    """``value`` quoted for a message: repr (control characters escaped), cut to a few dozen characters."""
    return _brief.repr(value)


def _plain(value: Any) -> str:
    """A short printable string as it is (a shape type, an XML tag), anything else as ``brief`` quotes it."""
    return value if isinstance(value, str) and len(value) <= 40 and value.isprintable() else brief(value)


@dataclass
class Shape:
    """One labelled region: ``kind`` is polygon, rectangle, ellipse (``data`` is x, y pairs; for an ellipse the
    corners of its box), coco_polygons (COCO's flat coordinate lists), rle (COCO's ``{"size", "counts"}``) or
    bitmap (the two corners and a boolean array); ``where`` names it in messages."""

    label: str
    kind: str
    data: Any
    where: str


@dataclass
class ImageEntry:
    """One annotated image: its file (or the bytes embedded in a labelme JSON), its size and shapes."""

    name: str
    width: int
    height: int
    shapes: list[Shape]
    path: Path | None = None
    data: bytes | None = None
    suffix: str = ".png"
    colors: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ImportReport:
    """What ``import_annotations`` wrote and every shape or image it left out (one line each); ``ignored``
    counts the shapes per ``void``/``ignore`` label, drawn as ignored pixels (255) rather than as a class."""

    out: Path
    classes: list[str]
    images: int = 0
    shapes: int = 0
    problems: list[str] = field(default_factory=list)
    train: int = 0
    val: int = 0
    ignored: dict[str, int] = field(default_factory=dict)


# ---- checking values ------------------------------------------------------------------------------------

def label_problem(name: str) -> str | None:
    """Why ``name`` cannot be a line of classes.txt that reads back as exactly ``name``; None when it can."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if len(name) > MAX_LABEL:
        return f"is {len(name):,} characters long; at most {MAX_LABEL}"
    for c in name:
        if c != " " and (c.isspace() or unicodedata.category(c)[0] in "CZ"):
            return f"holds the control or space character U+{ord(c):04X}, which would break its line in classes.txt"
    if name != name.strip(" ") or "  " in name:
        return "has leading, trailing or doubled spaces, which classes.txt does not keep"
    if name.startswith("#"):
        return "starts with '#', which classes.txt reads as a comment"
    if name.lower().startswith("ignore_value:"):
        return "starts with 'ignore_value:', a setting line in classes.txt"
    return None


def _num(v: Any) -> float | None:
    """A finite JSON number (not a bool or a string) as a float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer with hundreds of digits
        return None
    return f if math.isfinite(f) else None


def _size_problem(width: Any, height: Any) -> str | None:
    """Why an annotation's image size is unusable (whole numbers >= 1, within Pillow's pixel limit); None if fine."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (width, height)):
        return f"image size {brief(width)}x{brief(height)} is not two whole numbers >= 1"
    limit = Image.MAX_IMAGE_PIXELS or 2**31
    if width * height > limit:
        return f"image size {width}x{height} is over Pillow's limit of {limit:,} pixels"
    return None


def _whole(v: Any) -> Any:
    """A JSON width/height as int when it is a whole number (640 or 640.0); anything else unchanged, for
    ``_size_problem`` to name."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    return v


def _xy_pairs(raw: Any) -> list[tuple[float, float]] | str:
    """labelme's ``[[x, y], ...]`` as float pairs, or why not."""
    if not isinstance(raw, list):
        return "points is not a list of [x, y] pairs"
    if len(raw) > MAX_POINTS:
        return f"{len(raw):,} points; at most {MAX_POINTS:,} a shape"
    pts = []
    for p in raw:
        xy = [_num(v) for v in p] if isinstance(p, list) and len(p) == 2 else None
        if xy is None or None in xy:
            return f"point {brief(p)} is not a pair of finite numbers [x, y]"
        pts.append((xy[0], xy[1]))
    return pts


def _far_point(pts: list[tuple[float, float]], w: int, h: int) -> tuple[float, float] | None:
    """The first point that is not finite or lies further outside the w x h image than its larger side."""
    m = max(w, h)
    for x, y in pts:
        if not (-m <= x <= w + m and -m <= y <= h + m):  # False for NaN too
            return x, y
    return None


def _rle_runs(counts: str, limit: int) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string, or None when it is not one.

    The format (pycocotools ``rleToString``): each run is a signed number in 5-bit groups, low group first,
    one character per group (value + 48), bit 0x20 meaning another group follows and bit 0x10 of the last
    group the sign; from the fourth run on, the number is the difference to the run two before. At most
    ``limit`` runs are read (an image of N pixels has at most N + 1)."""
    runs: list[int] = []
    x = k = 0
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64 or k > 6 or len(runs) >= limit:  # 7 groups already exceed 32 bits
            return None
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x -= 1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
        x = k = 0
    return runs if k == 0 else None


def _rle(seg: dict, w: int, h: int) -> dict | str:
    """A COCO RLE checked against its w x h image, as ``{"size", "counts": [runs]}``, or why not."""
    size = seg.get("size")
    if not (isinstance(size, list) and size == [h, w] and all(type(v) is int for v in size)):
        return f"RLE size {brief(size)} is not the image's [{h}, {w}] (height, width)"
    counts = seg.get("counts")
    if isinstance(counts, str):
        runs = _rle_runs(counts, h * w + 1)
        if runs is None:
            return f"RLE counts {brief(counts)} is not a compressed COCO RLE of a {h}x{w} mask"
    elif isinstance(counts, list):
        if len(counts) > h * w + 1 or not all(type(v) is int for v in counts):
            return f"RLE counts {brief(counts)} is not a list of whole run lengths (at most {h * w + 1} runs)"
        runs = counts
    else:
        return f"RLE counts {brief(counts)} is neither a list of run lengths nor COCO's compressed string"
    if any(v < 0 for v in runs):
        return f"RLE counts hold a negative run length ({min(runs)})"
    if sum(runs) != h * w:
        return f"RLE runs cover {sum(runs):,} pixels, not the {h}x{w} image's {h * w:,}"
    return {"size": [h, w], "counts": list(runs)}


def _checked(s: Shape, w: int, h: int) -> Shape | str:
    """``s`` with its data checked against the w x h image (and normalised), or why it cannot be drawn."""
    if s.kind == "rle":
        data = _rle(s.data, w, h)
        return data if isinstance(data, str) else Shape(s.label, s.kind, data, s.where)
    if s.kind == "coco_polygons":
        pts, polys = [], []
        for p in s.data:
            vals = [_num(v) for v in p] if isinstance(p, list) else None
            if vals is None or len(vals) < 6 or len(vals) % 2:
                return f"polygon {brief(p)} is not a flat list of 3 or more x, y pairs"
            if None in vals:
                return f"polygon {brief(p)} holds a coordinate that is not a finite number"
            pts += list(zip(vals[::2], vals[1::2]))
            if len(pts) > MAX_POINTS:
                return f"over {MAX_POINTS:,} points; at most {MAX_POINTS:,} a shape"
            polys.append(vals)
        data: Any = polys
    else:
        pts = s.data[0] if s.kind == "bitmap" else s.data
        if len(pts) > MAX_POINTS:
            return f"{len(pts):,} points; at most {MAX_POINTS:,} a shape"
        data = s.data
    far = _far_point(pts, w, h)
    if far is not None:
        verb = "reaches" if s.kind == "ellipse" else "has a point at"
        return (f"{verb} ({far[0]:.6g}, {far[1]:.6g}), further outside the {w}x{h} image than its size "
                f"(coordinates are pixels)")
    return Shape(s.label, s.kind, data, s.where)


# ---- finding files --------------------------------------------------------------------------------------

def _within(path: Path, root: Path) -> bool:
    """Whether ``path``, links followed, lies inside ``root`` (decided from the names and links alone, so the
    answer does not depend on whether the file itself exists)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL in the name
        return False


def _find_image(name: str, dirs: list[Path], allow_outside: bool = False) -> tuple[Path | None, bool]:
    """The file ``name`` in the first of ``dirs`` that holds it, else by its base name (exports often keep
    folders in the name that the copy on disk lost); and whether a candidate leading outside its folder
    (absolute, '..', a link) was passed over. Outside candidates are never looked at without ``allow_outside``."""
    outside = False
    for cands in ([d / name for d in dirs], [d / Path(name).name for d in dirs]):
        for d, cand in zip(dirs, cands):
            if not allow_outside and not _within(cand, d):
                outside = True
                continue
            try:
                if cand.is_file():
                    return cand, outside
            except (OSError, ValueError):
                continue
    return None, outside


def _not_found(name: str, dirs: list[Path], outside: bool) -> str:
    return (f"image {brief(name)} not found in {', '.join(map(str, dirs))}"
            + ("; a name that leads outside those folders (absolute, '..' or a link) is followed only with "
               "--allow-outside" if outside else "") + "; skipped")


def _stem(name: str) -> str:
    """The file stem an image is written under: what split lists keep (no spaces, '#', control characters or
    leading dot; each becomes '_')."""
    s = "".join("_" if c.isspace() or c in "#/\\" or unicodedata.category(c)[0] == "C" else c for c in name)
    return "_" + s[1:] if s.startswith(".") else s or "_"


# ---- parsing --------------------------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FcnsegError(f"{path}: no such file" + ("" if not path.exists() else " (not a regular file)"))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise FcnsegError(f"{path}: not readable JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FcnsegError(f"{path}: not readable JSON ({e})") from None


def _labelme_bitmap(raw: Any, w: int, h: int) -> np.ndarray | str:
    """A labelme ``mask`` shape's bitmap (base64 PNG) as a bool array no larger than the w x h image, or why not."""
    if not isinstance(raw, str):
        return "'mask' is not a base64-encoded image"
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:
        return "'mask' is not base64"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=READABLE_FORMATS) as im:
                if im.width > w or im.height > h:  # checked from the header, before decoding
                    return f"mask bitmap is {im.width}x{im.height}, larger than the {w}x{h} image"
                return np.asarray(im.convert("L")) > 0
    except UnidentifiedImageError:
        return f"unreadable mask bitmap (not one of the formats fcnseg reads: {', '.join(READABLE_FORMATS)})"
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        return f"unreadable mask bitmap ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def parse_labelme(src: Path, images_dir: Path | None, problems: list[str],
                  allow_outside: bool = False) -> list[ImageEntry]:
    """A labelme JSON file or a folder of them; the image is ``imageData`` (embedded) or ``imagePath``."""
    files = sorted(src.glob("*.json")) if src.is_dir() else [src]
    if not files:
        raise FcnsegError(f"{src}: no labelme .json files in this folder")
    entries = []
    for path in files:
        doc = _load_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
            problems.append(f"{path}: not a labelme file (no 'shapes' list); skipped")
            continue
        width, height = _whole(doc.get("imageWidth")), _whole(doc.get("imageHeight"))
        bad = _size_problem(width, height)  # imageWidth, imageHeight
        image_path = doc.get("imagePath") or ""
        if bad is None and not isinstance(image_path, str):
            bad = f"imagePath {brief(image_path)} is not a file name"
        if bad:
            problems.append(f"{path}: {bad}; skipped")
            continue
        entry = ImageEntry(name=path.stem, width=width, height=height, shapes=[],
                           suffix=Path(image_path).suffix.lower() or ".png")
        if doc.get("imageData"):
            try:
                entry.data = base64.b64decode(doc["imageData"], validate=True)
            except (ValueError, TypeError):
                problems.append(f"{path}: imageData is not base64; skipped")
                continue
        else:
            dirs = [path.parent] + ([images_dir] if images_dir else [])
            found, outside = _find_image(image_path, dirs, allow_outside) if image_path else (None, False)
            if found is None:
                problems.append(f"{path}: " + _not_found(image_path, dirs, outside))
                continue
            entry.path, entry.suffix = found, found.suffix.lower()
        for i, s in enumerate(doc["shapes"]):
            if not isinstance(s, dict):
                problems.append(f"{path}: shape {i}: not an object; left out")
                continue
            label, kind = s.get("label"), s.get("shape_type") or "polygon"
            label = label.strip() if isinstance(label, str) else label
            where = f"{path}: shape {i} {brief(label)} ({_plain(kind)})"
            pts = _xy_pairs(s.get("points"))
            if not isinstance(label, str) or not label:
                problems.append(f"{where}: no label; left out")
            elif isinstance(pts, str):
                problems.append(f"{where}: {pts}; left out")
            elif kind == "polygon":
                if len(pts) < 3:
                    problems.append(f"{where}: a polygon needs 3 or more points, has {len(pts)}; left out")
                else:
                    entry.shapes.append(Shape(label, "polygon", pts, where))
            elif kind == "rectangle" and len(pts) == 2:
                entry.shapes.append(Shape(label, "rectangle", pts, where))
            elif kind == "circle" and len(pts) == 2:
                (cx, cy), (px, py) = pts
                r = math.hypot(px - cx, py - cy)
                entry.shapes.append(Shape(label, "ellipse", [(cx - r, cy - r), (cx + r, cy + r)], where))
            elif kind == "mask" and len(pts) == 2:
                bits = _labelme_bitmap(s.get("mask"), width, height)
                if isinstance(bits, str):
                    problems.append(f"{where}: {bits}; left out")
                else:
                    entry.shapes.append(Shape(label, "bitmap", (pts, bits), where))
            elif kind in ("line", "linestrip", "point", "points"):
                problems.append(f"{where}: a {kind} has no area; left out")
            else:
                problems.append(f"{where}: unsupported shape type with {len(pts)} points; left out")
        entries.append(entry)
    return entries


def _coco_id(v: Any) -> bool:
    """COCO ids are whole numbers (some tools write strings); anything else cannot key a lookup."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def parse_coco(src: Path, images_dir: Path | None, problems: list[str],
               allow_outside: bool = False) -> list[ImageEntry]:
    """A COCO instances JSON: ``images``, ``annotations`` (polygons or RLE, compressed or not), ``categories``."""
    doc = _load_json(src)
    keys = ("images", "annotations", "categories")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in keys):
        raise FcnsegError(f"{src}: not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)")
    cats: dict[Any, str] = {}
    for i, c in enumerate(doc["categories"]):
        if not (isinstance(c, dict) and _coco_id(c.get("id")) and isinstance(c.get("name"), str)):
            problems.append(f"{src}: category {i} {brief(c)} lacks a whole-number id or a name; left out")
        elif c["id"] in cats:
            problems.append(f"{src}: category id {brief(c['id'])} is listed twice; the first ({brief(cats[c['id']])}) "
                            f"is kept")
        else:
            cats[c["id"]] = c["name"].strip()
    dirs = [d for d in (images_dir, src.parent / "images", src.parent.parent / "images", src.parent) if d]
    entries: dict[Any, ImageEntry] = {}
    skipped = set()  # images already reported: their annotations need no line of their own
    for im in doc["images"]:
        name = im.get("file_name") if isinstance(im, dict) else None
        if not (isinstance(name, str) and _coco_id(im.get("id"))):
            problems.append(f"{src}: image entry {brief(im)} lacks an id or a file_name; skipped")
            continue
        width, height = _whole(im.get("width")), _whole(im.get("height"))
        bad = _size_problem(width, height)
        path, outside = _find_image(name, dirs, allow_outside) if bad is None else (None, False)
        if bad or path is None:
            problems.append(f"{src}: image {brief(name)}: {bad}; skipped" if bad else
                            f"{src}: " + _not_found(name, dirs, outside))
            skipped.add(im["id"])
            continue
        entries[im["id"]] = ImageEntry(name=Path(name).stem, width=width, height=height, shapes=[], path=path,
                                       suffix=path.suffix.lower())
    for i, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict):
            problems.append(f"{src}: annotation {i}: not an object; left out")
            continue
        image_id, cat_id = a.get("image_id"), a.get("category_id")
        where = f"{src}: annotation {brief(a.get('id', i))} (image {brief(image_id)})"
        if not (_coco_id(image_id) and _coco_id(cat_id)):
            problems.append(f"{where}: image_id and category_id must be whole numbers; left out")
            continue
        entry, label, seg = entries.get(image_id), cats.get(cat_id), a.get("segmentation")
        if entry is None:
            if image_id not in skipped:
                problems.append(f"{where}: no image with this id in 'images'; left out")
            continue
        if label is None:
            problems.append(f"{where}: category {brief(cat_id)} is not in 'categories'; left out")
        elif isinstance(seg, list) and seg:
            entry.shapes.append(Shape(label, "coco_polygons", seg, f"{where} {brief(label)}"))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            entry.shapes.append(Shape(label, "rle", seg, f"{where} {brief(label)}"))
        else:
            problems.append(f"{where} {brief(label)}: no polygon or RLE segmentation (a box alone has no mask); "
                            f"left out")
    return list(entries.values())


def parse_cvat(src: Path, images_dir: Path | None, problems: list[str],
               allow_outside: bool = False) -> list[ImageEntry]:
    """A CVAT for images 1.1 XML (``annotations.xml``): polygons, boxes and ellipses per ``<image>``."""
    import xml.etree.ElementTree as ET

    if not src.is_file():
        raise FcnsegError(f"{src}: no such file" + ("" if not src.exists() else " (not a regular file)"))
    text = src.read_bytes()
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:  # CVAT never writes these; entities can blow up a parser
        raise FcnsegError(f"{src}: refused: the XML declares a DOCTYPE/ENTITY, which CVAT exports never contain")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise FcnsegError(f"{src}: not readable XML ({e})") from None
    if root.tag != "annotations" or root.find("image") is None and root.find("track") is not None:
        raise FcnsegError(f"{src}: not a 'CVAT for images' export (root <{brief(root.tag)}>; video exports hold "
                          f"<track>s)")
    colors = {}
    for lab in root.iter("label"):
        name, color = (lab.findtext("name") or "").strip(), lab.findtext("color") or ""
        if name and re.fullmatch(r"#[0-9a-fA-F]{6}", color):
            colors[name] = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    dirs = [d for d in (images_dir, src.parent / "images", src.parent) if d]
    entries = []
    for im in root.iter("image"):
        name = im.get("name", "")
        try:
            width, height = int(im.get("width")), int(im.get("height"))
        except (TypeError, ValueError):
            width = height = None
        bad = _size_problem(width, height)
        path, outside = _find_image(name, dirs, allow_outside) if bad is None and name else (None, False)
        if bad or path is None:
            problems.append(f"{src}: <image name={brief(name)}>: {bad}; skipped" if bad else
                            f"{src}: " + _not_found(name, dirs, outside))
            continue
        entry = ImageEntry(name=Path(name).stem, width=width, height=height, shapes=[], path=path,
                           suffix=path.suffix.lower(), colors=colors)
        shapes = []
        for j, el in enumerate(im):
            label = el.get("label", "").strip()
            where = f"{src}: image {brief(name)} {_plain(el.tag)} {j} {brief(label)}"
            if el.tag in ("polygon", "box", "ellipse") and not label:
                problems.append(f"{where}: no label; left out")
                continue
            try:
                z = int(el.get("z_order", 0))
                if el.tag == "polygon":
                    raw = [p for p in el.get("points", "").split(";") if p]
                    if len(raw) > MAX_POINTS:
                        problems.append(f"{where}: {len(raw):,} points; at most {MAX_POINTS:,} a shape; left out")
                        continue
                    pts = [tuple(float(v) for v in p.split(",")) for p in raw]
                    if len(pts) < 3 or any(len(p) != 2 for p in pts):
                        problems.append(f"{where}: a polygon needs 3 or more x,y points; left out")
                        continue
                    shapes.append((z, j, Shape(label, "polygon", pts, where)))
                elif el.tag == "box":
                    if float(el.get("rotation", 0)):
                        problems.append(f"{where}: rotated boxes are not supported; left out")
                        continue
                    box = [(float(el.get("xtl")), float(el.get("ytl"))), (float(el.get("xbr")), float(el.get("ybr")))]
                    shapes.append((z, j, Shape(label, "rectangle", box, where)))
                elif el.tag == "ellipse":
                    cx, cy, rx, ry = (float(el.get(k)) for k in ("cx", "cy", "rx", "ry"))
                    shapes.append((z, j, Shape(label, "ellipse", [(cx - rx, cy - ry), (cx + rx, cy + ry)], where)))
                elif el.tag in ("polyline", "points", "skeleton", "cuboid", "mask", "tag"):
                    why = "has no area" if el.tag in ("polyline", "points", "skeleton") else "is not supported"
                    problems.append(f"{where}: a {el.tag} {why}" + (" (export as COCO to keep masks)"
                                                                   if el.tag == "mask" else "") + "; left out")
            except (TypeError, ValueError, OverflowError):
                problems.append(f"{where}: malformed coordinates; left out")
        # CVAT draws higher z_order on top; within one z, document order
        entry.shapes = [s for _, _, s in sorted(shapes, key=lambda t: (t[0], t[1]))]
        entries.append(entry)
    return entries


PARSERS = {"labelme": parse_labelme, "coco": parse_coco, "cvat": parse_cvat}


# ---- rasterising ----------------------------------------------------------------------------------------

def rasterize(shape: Shape, width: int, height: int) -> np.ndarray:
    """The shape's pixels as an (H, W) bool array; ``shape`` has passed ``_checked`` for this size (pycocotools
    and Pillow are never handed unchecked numbers: 1e300 crashes pycocotools, short RLE runs leave memory unset)."""
    if shape.kind in ("coco_polygons", "rle"):
        from pycocotools import mask as coco_mask

        # pycocotools' Cython code warns about NumPy 2's __array__ copy keyword: its own business, not the user's
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword")
            if shape.kind == "coco_polygons":
                rle = coco_mask.merge(coco_mask.frPyObjects(shape.data, height, width))
            else:
                rle = coco_mask.frPyObjects(shape.data, height, width)
            return coco_mask.decode(rle).astype(bool)
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape.kind == "polygon":
        draw.polygon(shape.data, fill=1, outline=1)
    elif shape.kind == "rectangle":
        (x0, y0), (x1, y1) = shape.data
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=1, outline=1)
    elif shape.kind == "ellipse":
        (x0, y0), (x1, y1) = shape.data
        draw.ellipse([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=1, outline=1)
    elif shape.kind == "bitmap":
        ((x0, y0), (x1, y1)), bits = shape.data
        origin = (int(round(min(x0, x1))), int(round(min(y0, y1))))
        canvas.paste(Image.fromarray(bits.astype(np.uint8) * 255).convert("1"), origin)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")
    return np.asarray(canvas, dtype=bool)


# ---- writing --------------------------------------------------------------------------------------------

def _class_names(labels: list[str], classes: list[str] | None, background: str,
                 first_use: dict[str, str]) -> list[str]:
    """Class 0 and the classes after it, each checked to read back from classes.txt as written."""
    problem = label_problem(background)
    if problem or background.lower() in IGNORE_NAMES:
        raise FcnsegError(f"background name {brief(background)} "
                          + (problem or "is read as 'ignored' in classes.txt") + "; choose another --background")
    if classes is not None:
        for c in classes:
            problem = label_problem(c)
            if problem:
                raise FcnsegError(f"class {brief(c)} in --classes {problem}")
            if classes.count(c) > 1:
                raise FcnsegError(f"class {brief(c)} is listed twice in --classes")
    chosen = [c for c in (labels if classes is None else classes) if c != background and c.lower() not in IGNORE_NAMES]
    for c in chosen:
        problem = label_problem(c)
        if problem:
            raise FcnsegError(f"label {brief(c)} (first at {first_use.get(c, '?')}) {problem}; rename it in the "
                              f"labelling tool (or leave it out with --classes)")
    return [background] + chosen


def import_annotations(fmt: str, src: str | Path, out: str | Path, *, images: str | Path | None = None,
                       background: str = "background", unlabelled: str = "background",
                       classes: list[str] | None = None, val_fraction: float = 0.1, seed: int = 0,
                       allow_outside: bool = False) -> ImportReport:
    """Convert a labelling tool's export at ``src`` into a folder dataset at ``out`` (new or empty).

    Class 0 is ``background``; the labels follow in the order of ``classes`` if given (a label not
    listed is reported and left out), else sorted. Labels named ``void`` or ``ignore`` (any case) are
    drawn as ignored pixels (255), not as a class. Pixels no shape covers are background, or ignored
    with ``unlabelled="ignore"``. ``images`` is where the export's image files are, when not beside the
    annotation file; files are read only from inside those folders unless ``allow_outside``. A label
    that classes.txt could not hold exactly (see ``label_problem``) stops the import before anything is
    written. Returns the report; every left-out shape or image is one line in it.
    """
    if fmt not in PARSERS:
        raise FcnsegError(f"unknown annotation format {fmt!r}; valid: {', '.join(FORMATS)}")
    if unlabelled not in ("background", "ignore"):
        raise FcnsegError(f"unlabelled must be 'background' or 'ignore', got {unlabelled!r}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    images_dir = Path(images).expanduser() if images else None
    if not src.exists():
        raise FcnsegError(f"{src}: no such {fmt} export")
    if images_dir is not None and not images_dir.is_dir():
        raise FcnsegError(f"{images_dir}: no such image folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FcnsegError(f"{out}: already exists and is not an empty folder; choose a new --out")
    if not 0 < val_fraction < 1:
        raise FcnsegError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    problems: list[str] = []
    src_file = src if fmt == "labelme" or src.is_file() else _default_file(fmt, src)
    entries = PARSERS[fmt](src_file, images_dir, problems, allow_outside)
    for e in entries:
        e.name = _stem(e.name)
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FcnsegError(f"{src}: several images share the name {dupes[0]!r} (without extension); "
                          f"masks are matched by name, so rename them in the export")
    first_use: dict[str, str] = {}
    for e in entries:
        for s in e.shapes:
            first_use.setdefault(s.label, s.where)
    classes = _class_names(sorted(first_use), classes, background, first_use)
    ids = {c: i for i, c in enumerate(classes)}
    ids.update({label: IGNORE_INDEX for label in first_use if label.lower() in IGNORE_NAMES})
    if len(classes) > 255:
        raise FcnsegError(f"{src}: {len(classes)} classes; at most 255 (value 255 is the ignore index)")
    given_colors = {k: v for e in entries for k, v in e.colors.items()}
    palette = default_palette(len(classes))
    colors = [given_colors.get(c, palette[i]) for i, c in enumerate(classes)]

    report = ImportReport(out=out, classes=classes, problems=problems)
    written = []
    for e in entries:
        if len(e.shapes) > MAX_SHAPES:
            problems.append(f"{e.path or e.name}: {len(e.shapes):,} shapes; at most {MAX_SHAPES:,} an image; skipped")
            continue
        if e.suffix not in IMAGE_SUFFIXES:
            problems.append(f"{e.path or e.name}: {brief(e.suffix)} is not an image suffix the folder reader lists "
                            f"({' '.join(IMAGE_SUFFIXES)}); skipped")
            continue
        shapes = []
        for s in e.shapes:  # every shape is checked before the image is read or anything is drawn
            if s.label not in ids:
                problems.append(f"{s.where}: label {brief(s.label)} is not in the class list; left out")
                continue
            checked = _checked(s, e.width, e.height)
            if isinstance(checked, str):
                problems.append(f"{s.where}: {checked}; left out")
            else:
                shapes.append(checked)
        try:
            image = read_image(e.path) if e.path else read_image_bytes(e.data, e.name)
        except DataFileError as err:
            problems.append(f"{err}; skipped")
            continue
        if image.size != (e.width, e.height):
            problems.append(f"{e.path or e.name}: image is {image.size[0]}x{image.size[1]} but the annotation says "
                            f"{e.width}x{e.height}; skipped")
            continue
        mask = np.full((e.height, e.width), IGNORE_INDEX if unlabelled == "ignore" else 0, dtype=np.uint8)
        for s in shapes:
            bits = rasterize(s, e.width, e.height)
            if not bits.any():
                problems.append(f"{s.where}: covers no pixel of the {e.width}x{e.height} image; left out")
                continue
            mask[bits] = ids[s.label]
            report.shapes += 1
            if ids[s.label] == IGNORE_INDEX:
                report.ignored[s.label] = report.ignored.get(s.label, 0) + 1
        _write_pair(out, e, mask, colors)
        written.append(e.name)
    if not written:
        raise FcnsegError(f"{src}: no image could be converted ({len(problems)} problems, first: "
                          f"{problems[0] if problems else 'none'})")
    val = holdout_split(written, "val", val_fraction, seed) if len(written) > 1 else []
    train = [n for n in written if n not in set(val)]
    write_classes_txt(out / "classes.txt", classes, colors)
    for split, items in (("train", train), ("val", val), ("all", written)):
        atomic_write(out / "splits" / f"{split}.txt", lambda tmp, items=items: Path(tmp).write_text(
            "".join(f"{n}\n" for n in items), encoding="utf-8"))
    report.images, report.train, report.val = len(written), len(train), len(val)
    return report


def write_classes_txt(path: Path, classes: list[str], colors: list[list[int]]) -> None:
    """``name R G B`` per line, read back by ``fcnseg.data.folder`` as the same names (``label_problem`` says which
    names could not be)."""
    for c in classes:
        problem = label_problem(c)
        if problem:
            raise FcnsegError(f"class {brief(c)} {problem}")
    lines = [f"{c} {r} {g} {b}" for c, (r, g, b) in zip(classes, colors)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))


def _default_file(fmt: str, src: Path) -> Path:
    """The annotation file inside an unpacked export folder."""
    cands = [src / "annotations.xml"] if fmt == "cvat" else sorted((src / "annotations").glob("*.json")) + sorted(
        src.glob("*.json"))
    for c in cands:
        if c.is_file():
            return c
    raise FcnsegError(f"{src}: a folder without {'annotations.xml' if fmt == 'cvat' else 'a COCO .json'}; "
                      f"pass the annotation file itself")


def read_image_bytes(data: bytes, name: str) -> Image.Image:
    """An image embedded in a labelme JSON, checked like a file (written to a temporary one)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.img"
        path.write_bytes(data)
        return read_image(path)


def _write_pair(out: Path, e: ImageEntry, mask: np.ndarray, colors: list[list[int]]) -> None:
    if e.path is not None:  # copied byte for byte: re-encoding a JPEG would change its pixels
        atomic_write(out / "images" / f"{e.name}{e.suffix}", lambda tmp: shutil.copyfile(e.path, tmp))
    else:
        atomic_write(out / "images" / f"{e.name}{e.suffix}", lambda tmp: Path(tmp).write_bytes(e.data))
    pal = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    flat = [v for c in colors for v in c]
    pal.putpalette(flat + [0] * (768 - len(flat)))
    atomic_write(out / "masks" / f"{e.name}.png", lambda tmp: pal.save(tmp, format="PNG"))
