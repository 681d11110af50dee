"""labelme's JSON files (one per image, the image embedded or beside it) parsed into ``ImageEntry``s."""
from __future__ import annotations

import base64
import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...errors import FcnsegError
from ..io import READABLE_FORMATS
from .checks import brief, find_image, load_json, not_found, plain, size_problem, whole, xy_pairs
from .shapes import ImageEntry, Shape


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
        doc = load_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
            problems.append(f"{path}: not a labelme file (no 'shapes' list); skipped")
            continue
        entry = _labelme_image(path, doc, images_dir, problems, allow_outside)
        if entry is None:
            continue
        for i, s in enumerate(doc["shapes"]):
            shape = _labelme_shape(path, i, s, entry.width, entry.height, problems)
            if shape is not None:
                entry.shapes.append(shape)
        entries.append(entry)
    return entries


def _labelme_image(path: Path, doc: dict, images_dir: Path | None, problems: list[str],
                   allow_outside: bool) -> ImageEntry | None:
    """The image of one labelme file (its size checked, its bytes embedded or its file found), shapes still
    empty; None when it is reported and skipped."""
    width, height = whole(doc.get("imageWidth")), whole(doc.get("imageHeight"))
    bad = size_problem(width, height)  # imageWidth, imageHeight
    image_path = doc.get("imagePath") or ""
    if bad is None and not isinstance(image_path, str):
        bad = f"imagePath {brief(image_path)} is not a file name"
    if bad:
        problems.append(f"{path}: {bad}; skipped")
        return None
    entry = ImageEntry(name=path.stem, width=width, height=height, shapes=[],
                       suffix=Path(image_path).suffix.lower() or ".png")
    if doc.get("imageData"):
        try:
            entry.data = base64.b64decode(doc["imageData"], validate=True)
        except (ValueError, TypeError):
            problems.append(f"{path}: imageData is not base64; skipped")
            return None
    else:
        dirs = [path.parent] + ([images_dir] if images_dir else [])
        found, outside = find_image(image_path, dirs, allow_outside) if image_path else (None, False)
        if found is None:
            problems.append(f"{path}: " + not_found(image_path, dirs, outside))
            return None
        entry.path, entry.suffix = found, found.suffix.lower()
    return entry


def _labelme_shape(path: Path, i: int, s: Any, width: int, height: int, problems: list[str]) -> Shape | None:
    """Shape ``i`` of a labelme file as a ``Shape``, or None when it is reported and left out."""
    if not isinstance(s, dict):
        problems.append(f"{path}: shape {i}: not an object; left out")
        return None
    label, kind = s.get("label"), s.get("shape_type") or "polygon"
    label = label.strip() if isinstance(label, str) else label
    where = f"{path}: shape {i} {brief(label)} ({plain(kind)})"
    pts = xy_pairs(s.get("points"))
    if not isinstance(label, str) or not label:
        problems.append(f"{where}: no label; left out")
    elif isinstance(pts, str):
        problems.append(f"{where}: {pts}; left out")
    elif kind == "polygon":
        if len(pts) >= 3:
            return Shape(label, "polygon", pts, where)
        problems.append(f"{where}: a polygon needs 3 or more points, has {len(pts)}; left out")
    elif kind == "rectangle" and len(pts) == 2:
        return Shape(label, "rectangle", pts, where)
    elif kind == "circle" and len(pts) == 2:
        (cx, cy), (px, py) = pts
        r = math.hypot(px - cx, py - cy)
        return Shape(label, "ellipse", [(cx - r, cy - r), (cx + r, cy + r)], where)
    elif kind == "mask" and len(pts) == 2:
        bits = _labelme_bitmap(s.get("mask"), width, height)
        if not isinstance(bits, str):
            return Shape(label, "bitmap", (pts, bits), where)
        problems.append(f"{where}: {bits}; left out")
    elif kind in ("line", "linestrip", "point", "points"):
        problems.append(f"{where}: a {kind} has no area; left out")
    else:
        problems.append(f"{where}: unsupported shape type with {len(pts)} points; left out")
    return None
