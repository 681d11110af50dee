"""Labelling-tool exports (labelme, COCO, CVAT for images) turned into a folder dataset.

Every tool's file is parsed into the same plain description (an image and its labelled shapes),
then one writer rasterises the shapes in file order (later shapes cover earlier ones) and writes
``images/``, ``masks/`` (palette PNGs of class ids), ``classes.txt`` (``name R G B``) and
``splits/{train,val}.txt``. Geometry comes from libraries, not from hand-written rasterisers:
Pillow's ``ImageDraw`` for labelme and CVAT polygons, boxes and ellipses (labelme draws its own
masks with it, so the pixels match the tool), and ``pycocotools`` for COCO polygons and RLE (the
rasterisation COCO's own tools define). A shape that cannot be converted is reported in one line
and left out; the rest of its image is kept.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_write
from ..record import default_palette
from ..errors import FcnsegError
from .base import IGNORE_INDEX, holdout_split
from .io import DataFileError, read_image

FORMATS = ("labelme", "coco", "cvat")


@dataclass
class Shape:
    """One labelled region: ``kind`` is polygon, rectangle, ellipse, coco (pycocotools segmentation)
    or bitmap (a boolean array at ``origin``); ``where`` names it in messages."""

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
    """What ``import_annotations`` wrote and every shape or image it left out (one line each)."""

    out: Path
    classes: list[str]
    images: int = 0
    shapes: int = 0
    problems: list[str] = field(default_factory=list)
    train: int = 0
    val: int = 0


# ---- parsing --------------------------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FcnsegError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FcnsegError(f"{path}: not readable JSON ({e})") from None


def _points(raw: Any) -> list[tuple[float, float]] | None:
    """[[x, y], ...] as floats, or None when malformed."""
    try:
        pts = [(float(p[0]), float(p[1])) for p in raw]
    except (TypeError, ValueError, IndexError):
        return None
    return pts if all(np.isfinite(v) for p in pts for v in p) else None


def _find_image(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        cand = d / name
        if cand.is_file():
            return cand
    for d in dirs:  # exports often keep folders in the name that the copy on disk lost
        cand = d / Path(name).name
        if cand.is_file():
            return cand
    return None


def parse_labelme(src: Path, images_dir: Path | None, problems: list[str]) -> list[ImageEntry]:
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
        try:
            width, height = int(doc["imageWidth"]), int(doc["imageHeight"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: no imageWidth/imageHeight; skipped")
            continue
        image_path = doc.get("imagePath") or ""
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
            entry.path = _find_image(image_path, dirs) if image_path else None
            if entry.path is None:
                problems.append(f"{path}: image {image_path!r} not found next to the JSON"
                                + (f" or in {images_dir}" if images_dir else "") + "; skipped")
                continue
        for i, s in enumerate(doc["shapes"]):
            label = str(s.get("label", "")).strip() if isinstance(s, dict) else ""
            kind = (s.get("shape_type") or "polygon") if isinstance(s, dict) else "?"
            where = f"{path}: shape {i} {label!r} ({kind})"
            pts = _points(s.get("points", [])) if isinstance(s, dict) else None
            if not label:
                problems.append(f"{where}: no label; left out")
            elif pts is None:
                problems.append(f"{where}: malformed points; left out")
            elif kind == "polygon":
                if len(pts) < 3:
                    problems.append(f"{where}: a polygon needs 3 or more points, has {len(pts)}; left out")
                else:
                    entry.shapes.append(Shape(label, "polygon", pts, where))
            elif kind == "rectangle" and len(pts) == 2:
                entry.shapes.append(Shape(label, "rectangle", pts, where))
            elif kind == "circle" and len(pts) == 2:
                (cx, cy), (px, py) = pts
                r = float(np.hypot(px - cx, py - cy))
                entry.shapes.append(Shape(label, "ellipse", [(cx - r, cy - r), (cx + r, cy + r)], where))
            elif kind == "mask" and len(pts) == 2 and s.get("mask"):
                try:
                    bits = np.asarray(Image.open(io.BytesIO(base64.b64decode(s["mask"]))).convert("L")) > 0
                except (ValueError, OSError) as e:
                    problems.append(f"{where}: unreadable mask bitmap ({e}); left out")
                    continue
                origin = (int(round(min(pts[0][0], pts[1][0]))), int(round(min(pts[0][1], pts[1][1]))))
                entry.shapes.append(Shape(label, "bitmap", (origin, bits), where))
            elif kind in ("line", "linestrip", "point", "points"):
                problems.append(f"{where}: a {kind} has no area; left out")
            else:
                problems.append(f"{where}: unsupported shape type with {len(pts)} points; left out")
        entries.append(entry)
    return entries


def parse_coco(src: Path, images_dir: Path | None, problems: list[str]) -> list[ImageEntry]:
    """A COCO instances JSON: ``images``, ``annotations`` (polygons or RLE, compressed or not), ``categories``."""
    doc = _load_json(src)
    keys = ("images", "annotations", "categories")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in keys):
        raise FcnsegError(f"{src}: not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)")
    cats = {c.get("id"): str(c.get("name")) for c in doc["categories"] if isinstance(c, dict)}
    dirs = [d for d in (images_dir, src.parent / "images", src.parent.parent / "images", src.parent) if d]
    entries: dict[Any, ImageEntry] = {}
    skipped = set()  # images already reported: their annotations need no line of their own
    for im in doc["images"]:
        try:
            name, width, height = str(im["file_name"]), int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{src}: image entry {im!r:.80} lacks file_name/width/height; skipped")
            continue
        path = _find_image(name, dirs)
        if path is None:
            problems.append(f"{src}: image {name!r} not found in {', '.join(map(str, dirs))}; skipped")
            skipped.add(im.get("id"))
            continue
        entries[im.get("id")] = ImageEntry(name=Path(name).stem, width=width, height=height, shapes=[], path=path,
                                           suffix=path.suffix.lower())
    for i, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict):
            problems.append(f"{src}: annotation {i}: not an object; left out")
            continue
        where = f"{src}: annotation {a.get('id', i)} (image {a.get('image_id')})"
        entry = entries.get(a.get("image_id"))
        label = cats.get(a.get("category_id"))
        seg = a.get("segmentation")
        if entry is None:
            if a.get("image_id") not in skipped:
                problems.append(f"{where}: no image with this id in 'images'; left out")
            continue
        if label is None:
            problems.append(f"{where}: category {a.get('category_id')} is not in 'categories'; left out")
        elif isinstance(seg, list) and seg:
            polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                     and all(isinstance(v, (int, float)) for v in p)]
            if len(polys) != len(seg):
                problems.append(f"{where} {label!r}: {len(seg) - len(polys)} polygon(s) with fewer than 3 points or "
                                f"non-numeric coordinates; left out")
            if polys:
                entry.shapes.append(Shape(label, "coco", polys, where))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if list(seg["size"]) != [entry.height, entry.width]:
                problems.append(f"{where} {label!r}: RLE size {seg['size']} is not the image's "
                                f"[{entry.height}, {entry.width}]; left out")
            else:
                entry.shapes.append(Shape(label, "coco", seg, where))
        else:
            problems.append(f"{where} {label!r}: no polygon or RLE segmentation (a box alone has no mask); left out")
    return list(entries.values())


def parse_cvat(src: Path, images_dir: Path | None, problems: list[str]) -> list[ImageEntry]:
    """A CVAT for images 1.1 XML (``annotations.xml``): polygons, boxes and ellipses per ``<image>``."""
    import xml.etree.ElementTree as ET

    try:
        text = src.read_bytes()
    except FileNotFoundError:
        raise FcnsegError(f"{src}: no such file") from None
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:  # CVAT never writes these; entities can blow up a parser
        raise FcnsegError(f"{src}: refused: the XML declares a DOCTYPE/ENTITY, which CVAT exports never contain")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise FcnsegError(f"{src}: not readable XML ({e})") from None
    if root.tag != "annotations" or root.find("image") is None and root.find("track") is not None:
        raise FcnsegError(f"{src}: not a 'CVAT for images' export (root <{root.tag}>; video exports hold <track>s)")
    colors = {}
    for lab in root.iter("label"):
        name, color = lab.findtext("name"), lab.findtext("color") or ""
        if name and re.fullmatch(r"#[0-9a-fA-F]{6}", color):
            colors[name] = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    dirs = [d for d in (images_dir, src.parent / "images", src.parent) if d]
    entries = []
    for im in root.iter("image"):
        name = im.get("name", "")
        try:
            width, height = int(im.get("width")), int(im.get("height"))
        except (TypeError, ValueError):
            problems.append(f"{src}: <image name={name!r}> lacks width/height; skipped")
            continue
        path = _find_image(name, dirs)
        if path is None:
            problems.append(f"{src}: image {name!r} not found in {', '.join(map(str, dirs))}; skipped")
            continue
        entry = ImageEntry(name=Path(name).stem, width=width, height=height, shapes=[], path=path,
                           suffix=path.suffix.lower(), colors=colors)
        shapes = []
        for j, el in enumerate(im):
            label = el.get("label", "")
            where = f"{src}: image {name!r} {el.tag} {j} {label!r}"
            try:
                z = int(el.get("z_order", 0))
                if el.tag == "polygon":
                    pts = [tuple(float(v) for v in p.split(",")) for p in el.get("points", "").split(";") if p]
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
            except (TypeError, ValueError):
                problems.append(f"{where}: malformed coordinates; left out")
        # CVAT draws higher z_order on top; within one z, document order
        entry.shapes = [s for _, _, s in sorted(shapes, key=lambda t: (t[0], t[1]))]
        entries.append(entry)
    return entries


PARSERS = {"labelme": parse_labelme, "coco": parse_coco, "cvat": parse_cvat}


# ---- rasterising ----------------------------------------------------------------------------------------

def rasterize(shape: Shape, width: int, height: int) -> np.ndarray:
    """The shape's pixels as an (H, W) bool array."""
    if shape.kind == "coco":
        from pycocotools import mask as coco_mask

        seg = shape.data
        # pycocotools' Cython code warns about NumPy 2's __array__ copy keyword: its own business, not the user's
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword")
            if isinstance(seg, list):
                rle = coco_mask.merge(coco_mask.frPyObjects(seg, height, width))
            elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = coco_mask.frPyObjects(seg, height, width)
            else:
                rle = {"size": list(seg["size"]), "counts": seg["counts"].encode() if isinstance(seg["counts"], str)
                       else seg["counts"]}
            return coco_mask.decode(rle).astype(bool)
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape.kind == "polygon":
        draw.polygon(shape.data, fill=1, outline=1)
    elif shape.kind == "rectangle":
        (x0, y0), (x1, y1) = shape.data
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=1, outline=1)
    elif shape.kind == "ellipse":
        draw.ellipse(shape.data, fill=1, outline=1)
    elif shape.kind == "bitmap":
        (ox, oy), bits = shape.data
        canvas.paste(Image.fromarray(bits.astype(np.uint8) * 255).convert("1"), (ox, oy))
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")
    return np.asarray(canvas, dtype=bool)


# ---- writing --------------------------------------------------------------------------------------------

def import_annotations(fmt: str, src: str | Path, out: str | Path, *, images: str | Path | None = None,
                       background: str = "background", unlabelled: str = "background",
                       classes: list[str] | None = None, val_fraction: float = 0.1, seed: int = 0) -> ImportReport:
    """Convert a labelling tool's export at ``src`` into a folder dataset at ``out`` (new or empty).

    Class 0 is ``background``; the labels follow in the order of ``classes`` if given (a label not
    listed is reported and left out), else sorted. Pixels no shape covers are background, or ignored
    (255) with ``unlabelled="ignore"``. ``images`` is where the export's image files are, when not
    beside the annotation file. Returns the report; every left-out shape is one line in it.
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
    entries = PARSERS[fmt](src if fmt == "labelme" or src.is_file() else _default_file(fmt, src), images_dir, problems)
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FcnsegError(f"{src}: several images share the name {dupes[0]!r} (without extension); "
                          f"masks are matched by name, so rename them in the export")
    labels = sorted({s.label for e in entries for s in e.shapes})
    if classes is None:
        classes = [c for c in labels if c != background]
    classes = [background] + [c for c in classes if c != background]
    ids = {c: i for i, c in enumerate(classes)}
    if len(classes) > 255:
        raise FcnsegError(f"{src}: {len(classes)} classes; at most 255 (value 255 is the ignore index)")
    given_colors = {k: v for e in entries for k, v in e.colors.items()}
    palette = default_palette(len(classes))
    colors = [given_colors.get(c, palette[i]) for i, c in enumerate(classes)]

    report = ImportReport(out=out, classes=classes, problems=problems)
    written = []
    for e in entries:
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
        for s in e.shapes:
            if s.label not in ids:
                problems.append(f"{s.where}: label {s.label!r} is not in the class list; left out")
                continue
            mask[rasterize(s, e.width, e.height)] = ids[s.label]
            report.shapes += 1
        _write_pair(out, e, mask, colors)
        written.append(e.name)
    if not written:
        raise FcnsegError(f"{src}: no image could be converted ({len(problems)} problems, first: "
                          f"{problems[0] if problems else 'none'})")
    val = holdout_split(written, "val", val_fraction, seed) if len(written) > 1 else []
    train = [n for n in written if n not in set(val)]
    lines = [f"{c} {r} {g} {b}" for c, (r, g, b) in zip(classes, colors)]
    atomic_write(out / "classes.txt", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    for split, items in (("train", train), ("val", val), ("all", written)):
        atomic_write(out / "splits" / f"{split}.txt", lambda tmp, items=items: Path(tmp).write_text(
            "".join(f"{n}\n" for n in items)))
    report.images, report.train, report.val = len(written), len(train), len(val)
    return report


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
