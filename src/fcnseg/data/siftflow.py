"""SIFT Flow semantic labels: ``images/*.jpg``, ``labels/*.png`` (0 void, 1..33), split lists."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import default_palette
from .base import IGNORE_INDEX, SegmentationDataset, check_split, holdout_split, read_list, register_dataset

SIFTFLOW_CLASSES = ["awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "crosswalk",
                    "desert", "door", "fence", "field", "grass", "moon", "mountain", "person", "plant", "pole",
                    "river", "road", "rock", "sand", "sea", "sidewalk", "sign", "sky", "staircase", "streetlight",
                    "sun", "tree", "window"]


@register_dataset("siftflow")
def siftflow(root: Path, split: str, transforms=None, skip_bad: bool = False, split_list: str | Path | None = None,
             val_fraction: float = 0.1, seed: int = 0) -> SegmentationDataset:
    """SIFT Flow. Splits: ``trainval`` (trainval.txt), ``test`` (test.txt), and ``train``/``val``: trainval with a
    fixed ``val_fraction`` held out by ``seed``. ``split_list`` reads the names from a file you give instead."""
    if split_list is not None:
        names = read_list(Path(split_list))
    else:
        check_split("siftflow", split, ("train", "val", "trainval", "test"))
        names = read_list(root / ("test.txt" if split == "test" else "trainval.txt"))
        if split in ("train", "val"):
            names = holdout_split(names, split, val_fraction, seed)
    files = [(root / "images" / f"{n}.jpg", root / "labels" / f"{n}.png") for n in names]
    value_map = {0: IGNORE_INDEX} | {v: v - 1 for v in range(1, len(SIFTFLOW_CLASSES) + 1)}
    return SegmentationDataset(name="siftflow", root=root, split=split, files=files, names=names,
                               classes=SIFTFLOW_CLASSES, colors=default_palette(len(SIFTFLOW_CLASSES) + 1)[1:],
                               transforms=transforms, value_map=value_map, skip_bad=skip_bad)
