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

Modules: ``shapes`` (the plain description and the rasteriser), ``checks`` (hostile-input checks: numbers, sizes,
vertex counts, RLE runs, file names), ``labelme``, ``coco``, ``cvat`` (one parser each) and ``convert`` (the
driver, ``import_annotations``, and the writer).
"""
from .checks import MAX_LABEL, MAX_POINTS, MAX_SHAPES, brief, label_problem, rle_runs
from .coco import parse_coco
from .convert import FORMATS, PARSERS, import_annotations, read_image_bytes, write_classes_txt
from .cvat import parse_cvat
from .labelme import parse_labelme
from .shapes import ImageEntry, ImportReport, Shape, rasterize

__all__ = ["FORMATS", "MAX_LABEL", "MAX_POINTS", "MAX_SHAPES", "PARSERS", "ImageEntry", "ImportReport", "Shape",
           "brief", "import_annotations", "label_problem", "parse_coco", "parse_cvat", "parse_labelme", "rasterize",
           "read_image_bytes", "rle_runs", "write_classes_txt"]
