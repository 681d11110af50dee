"""COCO instances JSON (polygons or RLE, compressed or not) parsed into ``ImageEntry``s."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import FcnsegError
from .checks import brief, find_image, load_json, not_found, size_problem, whole
from .shapes import ImageEntry, Shape


def _coco_id(v: Any) -> bool:
    """COCO ids are whole numbers (some tools write strings); anything else cannot key a lookup."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def parse_coco(src: Path, images_dir: Path | None, problems: list[str],
               allow_outside: bool = False) -> list[ImageEntry]:
    """A COCO instances JSON: ``images``, ``annotations`` (polygons or RLE, compressed or not), ``categories``."""
    doc = load_json(src)
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
        width, height = whole(im.get("width")), whole(im.get("height"))
        bad = size_problem(width, height)
        path, outside = find_image(name, dirs, allow_outside) if bad is None else (None, False)
        if bad or path is None:
            problems.append(f"{src}: image {brief(name)}: {bad}; skipped" if bad else
                            f"{src}: " + not_found(name, dirs, outside))
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
