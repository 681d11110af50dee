"""CamVid: the 11-class SegNet layout (``camvid``) and the original 32-class colour-coded release (``camvid32``)."""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import FcnsegError
from .base import IGNORE_INDEX, SegmentationDataset, check_split, pair_folders, register_dataset
from .dev import carve

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]
CAMVID_COLORS = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                 [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
CAMVID_VOID = 11


@register_dataset("camvid")
def camvid(root: Path, split: str, transforms=None, skip_bad: bool = False) -> SegmentationDataset:
    """SegNet's CamVid: ``root/{train,val,test}`` RGB images, ``root/{split}annot`` label maps (0..10, 11 void).
    ``dev`` and ``fit`` are carved from train by the shipped dev list (``fcnseg.data.dev``): choose on dev,
    train on fit, report val."""
    check_split("camvid", split, ("train", "val", "test", "dev", "fit"))
    folder = "train" if split in ("dev", "fit") else split
    files, names, problems = pair_folders(root / folder, root / f"{folder}annot", mask_name=lambda s: f"{s}.png")
    if folder != split:
        keep = carve("camvid", split, names)
        by_name = dict(zip(names, files))
        files, names = [by_name[n] for n in keep], keep
    value_map = {i: i for i in range(len(CAMVID_CLASSES))} | {CAMVID_VOID: IGNORE_INDEX}
    return SegmentationDataset(name="camvid", root=root, split=split, files=files, names=names,
                               classes=CAMVID_CLASSES, colors=CAMVID_COLORS, transforms=transforms,
                               value_map=value_map, skip_bad=skip_bad, problems=problems)


def read_class_dict(path: Path) -> tuple[list[str], list[list[int]]]:
    """``class_dict.csv`` rows ``name,r,g,b`` (a header line is allowed)."""
    if not path.is_file():
        raise FcnsegError(f"{path}: class table not found (expected name,r,g,b rows)")
    names, colors = [], []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or (lineno == 1 and row[0].lower() in ("name", "class")):
                continue
            try:
                name, r, g, b = row
                rgb = [int(r), int(g), int(b)]
            except ValueError:
                raise FcnsegError(f"{path}:{lineno}: expected 'name,r,g,b', got {','.join(row)!r}") from None
            if not all(0 <= v <= 255 for v in rgb):
                raise FcnsegError(f"{path}:{lineno}: colour values must be 0..255, got {rgb}")
            names.append(name)
            colors.append(rgb)
    return names, colors


@register_dataset("camvid32")
def camvid32(root: Path, split: str, transforms=None, skip_bad: bool = False,
             void_names: tuple[str, ...] = ("void",)) -> SegmentationDataset:
    """The original 32-class CamVid as distributed on Kaggle: ``{split}/NAME.png``, ``{split}_labels/NAME_L.png``
    colour-coded through ``class_dict.csv``. The ``Void`` colour maps to the ignore index, leaving 31 classes."""
    check_split("camvid32", split, ("train", "val", "test"))
    names_all, colors_all = read_class_dict(root / "class_dict.csv")
    classes, colors, color_map = [], [], {}
    for name, rgb in zip(names_all, colors_all):
        if name.lower() in void_names:
            color_map[tuple(rgb)] = IGNORE_INDEX
        else:
            color_map[tuple(rgb)] = len(classes)
            classes.append(name)
            colors.append(rgb)
    files, names, problems = pair_folders(root / split, root / f"{split}_labels", mask_name=lambda s: f"{s}_L.png")
    return SegmentationDataset(name="camvid32", root=root, split=split, files=files, names=names,
                               classes=classes, colors=colors, transforms=transforms,
                               color_map=color_map, skip_bad=skip_bad, problems=problems)
