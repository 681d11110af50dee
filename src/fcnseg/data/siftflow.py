"""SIFT Flow: ``images/*.jpg``, semantic ``labels/*.png`` (0 void, 1..33), optional ``geolabels/*.png``, split lists.

Geometric labels (the paper's second head: sky / horizontal / vertical, ``geolabels/*.png`` with 0 void,
1 sky, 2 horizontal, 3 vertical) are read from ``geolabels/`` when the copy has it. Otherwise they are
*derived* from the semantic labels with ``SIFTFLOW_GEOMETRY`` below (a surface that supports things or
is walked/driven/sailed on is horizontal; sky, sun and moon are sky; everything else, objects included,
is vertical); the dataset then says so in ``label_source``, and scores on it are not the paper's.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import default_palette
from ..errors import FcnsegError
from .base import IGNORE_INDEX, SegmentationDataset, check_split, holdout_split, read_list, register_dataset

SIFTFLOW_CLASSES = ["awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "crosswalk",
                    "desert", "door", "fence", "field", "grass", "moon", "mountain", "person", "plant", "pole",
                    "river", "road", "rock", "sand", "sea", "sidewalk", "sign", "sky", "staircase", "streetlight",
                    "sun", "tree", "window"]
GEOMETRIC_CLASSES = ["sky", "horizontal", "vertical"]
#: semantic class -> geometric class, for copies without geometric label files
SIFTFLOW_GEOMETRY = {
    "sky": "sky", "sun": "sky", "moon": "sky",
    "crosswalk": "horizontal", "desert": "horizontal", "field": "horizontal", "grass": "horizontal",
    "river": "horizontal", "road": "horizontal", "sand": "horizontal", "sea": "horizontal", "sidewalk": "horizontal",
    **{c: "vertical" for c in ["awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "door",
                               "fence", "mountain", "person", "plant", "pole", "rock", "sign", "staircase",
                               "streetlight", "tree", "window"]},
}
DERIVED = "derived from semantic labels (fcnseg's SIFTFLOW_GEOMETRY table)"


@register_dataset("siftflow")
def siftflow(root: Path, split: str, transforms=None, skip_bad: bool = False, split_list: str | Path | None = None,
             val_fraction: float = 0.1, seed: int = 0, labels: str = "semantic") -> SegmentationDataset:
    """SIFT Flow. Splits: ``trainval`` (trainval.txt), ``test`` (test.txt), and ``train``/``val``: trainval with a
    fixed ``val_fraction`` held out by ``seed``. ``split_list`` reads the names from a file you give instead.
    ``labels``: 'semantic' (33 classes) or 'geometric' (3; from ``geolabels/`` or derived, see ``label_source``)."""
    if labels not in ("semantic", "geometric"):
        raise FcnsegError(f"unknown SIFT Flow labels {labels!r}; valid: semantic, geometric")
    if split_list is not None:
        names = read_list(Path(split_list))
    else:
        check_split("siftflow", split, ("train", "val", "trainval", "test"))
        names = read_list(root / ("test.txt" if split == "test" else "trainval.txt"))
        if split in ("train", "val"):
            names = holdout_split(names, split, val_fraction, seed)
    classes, source, folder = SIFTFLOW_CLASSES, "semantic label files", "labels"
    value_map = {0: IGNORE_INDEX} | {v: v - 1 for v in range(1, len(SIFTFLOW_CLASSES) + 1)}
    if labels == "geometric":
        classes = GEOMETRIC_CLASSES
        if (root / "geolabels").is_dir():
            source, folder = "geometric label files", "geolabels"
            value_map = {0: IGNORE_INDEX} | {v: v - 1 for v in range(1, len(GEOMETRIC_CLASSES) + 1)}
        else:  # never silently: the dataset records that its labels are derived
            source = DERIVED
            value_map = {0: IGNORE_INDEX} | {v: GEOMETRIC_CLASSES.index(SIFTFLOW_GEOMETRY[c])
                                              for v, c in enumerate(SIFTFLOW_CLASSES, start=1)}
    files = [(root / "images" / f"{n}.jpg", root / folder / f"{n}.png") for n in names]
    dataset = SegmentationDataset(name="siftflow", root=root, split=split, files=files, names=names,
                                  classes=classes, colors=default_palette(len(classes) + 1)[1:],
                                  transforms=transforms, value_map=value_map, skip_bad=skip_bad)
    dataset.label_source = source
    return dataset
