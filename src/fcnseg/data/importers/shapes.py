"""The plain description every importer parses a tool's file into (an image and its labelled shapes), what an
import reports, and the one rasteriser that turns a checked shape into pixels."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


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


def rasterize(shape: Shape, width: int, height: int) -> np.ndarray:
    """The shape's pixels as an (H, W) bool array; ``shape`` has passed ``checked_shape`` for this size (pycocotools
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

