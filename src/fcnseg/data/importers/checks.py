"""Hostile-input checks of the importers: every number, size, vertex count, RLE run and file name of an export is
checked against its image (and the folders it may be read from) before anything is drawn or opened; each check
returns the value in a plain form or one line saying why not."""
from __future__ import annotations

import json
import math
import reprlib
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image

from ...errors import FcnsegError
from .shapes import Shape

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


def plain(value: Any) -> str:
    """A short printable string as it is (a shape type, an XML tag), anything else as ``brief`` quotes it."""
    return value if isinstance(value, str) and len(value) <= 40 and value.isprintable() else brief(value)


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


def number(v: Any) -> float | None:
    """A finite JSON number (not a bool or a string) as a float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer with hundreds of digits
        return None
    return f if math.isfinite(f) else None


def size_problem(width: Any, height: Any) -> str | None:
    """Why an annotation's image size is unusable (whole numbers >= 1, within Pillow's pixel limit); None if fine."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (width, height)):
        return f"image size {brief(width)}x{brief(height)} is not two whole numbers >= 1"
    limit = Image.MAX_IMAGE_PIXELS or 2**31
    if width * height > limit:
        return f"image size {width}x{height} is over Pillow's limit of {limit:,} pixels"
    return None


def whole(v: Any) -> Any:
    """A JSON width/height as int when it is a whole number (640 or 640.0); anything else unchanged, for
    ``size_problem`` to name."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    return v


def xy_pairs(raw: Any) -> list[tuple[float, float]] | str:
    """labelme's ``[[x, y], ...]`` as float pairs, or why not."""
    if not isinstance(raw, list):
        return "points is not a list of [x, y] pairs"
    if len(raw) > MAX_POINTS:
        return f"{len(raw):,} points; at most {MAX_POINTS:,} a shape"
    pts = []
    for p in raw:
        xy = [number(v) for v in p] if isinstance(p, list) and len(p) == 2 else None
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


def rle_runs(counts: str, limit: int) -> list[int] | None:
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
        runs = rle_runs(counts, h * w + 1)
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


def checked_shape(s: Shape, w: int, h: int) -> Shape | str:
    """``s`` with its data checked against the w x h image (and normalised), or why it cannot be drawn."""
    if s.kind == "rle":
        data = _rle(s.data, w, h)
        return data if isinstance(data, str) else Shape(s.label, s.kind, data, s.where)
    if s.kind == "coco_polygons":
        pts, polys = [], []
        for p in s.data:
            vals = [number(v) for v in p] if isinstance(p, list) else None
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


def find_image(name: str, dirs: list[Path], allow_outside: bool = False) -> tuple[Path | None, bool]:
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


def not_found(name: str, dirs: list[Path], outside: bool) -> str:
    return (f"image {brief(name)} not found in {', '.join(map(str, dirs))}"
            + ("; a name that leads outside those folders (absolute, '..' or a link) is followed only with "
               "--allow-outside" if outside else "") + "; skipped")


def file_stem(name: str) -> str:
    """The file stem an image is written under: what split lists keep (no spaces, '#', control characters or
    leading dot; each becomes '_')."""
    s = "".join("_" if c.isspace() or c in "#/\\" or unicodedata.category(c)[0] == "C" else c for c in name)
    return "_" + s[1:] if s.startswith(".") else s or "_"


def load_json(path: Path) -> Any:
    if not path.is_file():
        raise FcnsegError(f"{path}: no such file" + ("" if not path.exists() else " (not a regular file)"))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise FcnsegError(f"{path}: not readable JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FcnsegError(f"{path}: not readable JSON ({e})") from None


