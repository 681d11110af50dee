"""CVAT for images 1.1 XML (``annotations.xml``) parsed into ``ImageEntry``s: polygons, boxes and ellipses."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ...errors import FcnsegError
from .checks import MAX_POINTS, brief, find_image, not_found, plain, size_problem
from .shapes import ImageEntry, Shape


def parse_cvat(src: Path, images_dir: Path | None, problems: list[str],
               allow_outside: bool = False) -> list[ImageEntry]:
    """A CVAT for images 1.1 XML (``annotations.xml``): polygons, boxes and ellipses per ``<image>``."""
    root = _cvat_root(src)
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
        bad = size_problem(width, height)
        path, outside = find_image(name, dirs, allow_outside) if bad is None and name else (None, False)
        if bad or path is None:
            problems.append(f"{src}: <image name={brief(name)}>: {bad}; skipped" if bad else
                            f"{src}: " + not_found(name, dirs, outside))
            continue
        entry = ImageEntry(name=Path(name).stem, width=width, height=height, shapes=[], path=path,
                           suffix=path.suffix.lower(), colors=colors)
        shapes = []
        for j, el in enumerate(im):
            z_shape = _cvat_shape(src, name, j, el, problems)
            if z_shape is not None:
                shapes.append((z_shape[0], j, z_shape[1]))
        # CVAT draws higher z_order on top; within one z, document order
        entry.shapes = [s for _, _, s in sorted(shapes, key=lambda t: (t[0], t[1]))]
        entries.append(entry)
    return entries


def _cvat_root(src: Path) -> ET.Element:
    """The root ``<annotations>`` of a CVAT for images file, refused in one line when it is not one."""
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
    return root


def _cvat_shape(src: Path, name: str, j: int, el: ET.Element, problems: list[str]) -> tuple[int, Shape] | None:
    """Child ``j`` of an ``<image>`` as (z_order, Shape), or None when it is reported and left out (or holds no
    shape at all, like an ``<attribute>``)."""
    label = el.get("label", "").strip()
    where = f"{src}: image {brief(name)} {plain(el.tag)} {j} {brief(label)}"
    if el.tag in ("polygon", "box", "ellipse") and not label:
        problems.append(f"{where}: no label; left out")
        return None
    try:
        z = int(el.get("z_order", 0))
        if el.tag == "polygon":
            raw = [p for p in el.get("points", "").split(";") if p]
            if len(raw) > MAX_POINTS:
                problems.append(f"{where}: {len(raw):,} points; at most {MAX_POINTS:,} a shape; left out")
                return None
            pts = [tuple(float(v) for v in p.split(",")) for p in raw]
            if len(pts) < 3 or any(len(p) != 2 for p in pts):
                problems.append(f"{where}: a polygon needs 3 or more x,y points; left out")
                return None
            return z, Shape(label, "polygon", pts, where)
        if el.tag == "box":
            if float(el.get("rotation", 0)):
                problems.append(f"{where}: rotated boxes are not supported; left out")
                return None
            box = [(float(el.get("xtl")), float(el.get("ytl"))), (float(el.get("xbr")), float(el.get("ybr")))]
            return z, Shape(label, "rectangle", box, where)
        if el.tag == "ellipse":
            cx, cy, rx, ry = (float(el.get(k)) for k in ("cx", "cy", "rx", "ry"))
            return z, Shape(label, "ellipse", [(cx - rx, cy - ry), (cx + rx, cy + ry)], where)
        if el.tag in ("polyline", "points", "skeleton", "cuboid", "mask", "tag"):
            why = "has no area" if el.tag in ("polyline", "points", "skeleton") else "is not supported"
            problems.append(f"{where}: a {el.tag} {why}" + (" (export as COCO to keep masks)"
                                                           if el.tag == "mask" else "") + "; left out")
    except (TypeError, ValueError, OverflowError):
        problems.append(f"{where}: malformed coordinates; left out")
    return None
