"""SIFT Flow: ``images/*.jpg``, semantic ``labels/*.png`` (0 void, 1..33), optional ``geolabels/*.png``, split lists.

Geometric labels (the paper's second head: sky / horizontal / vertical, ``geolabels/*.png`` with 0 void,
1 sky, 2 horizontal, 3 vertical) are read from ``geolabels/`` when the copy has it. Otherwise they are
*derived* from the semantic labels with ``SIFTFLOW_GEOMETRY`` below (a surface that supports things or
is walked/driven/sailed on is horizontal; sky, sun and moon are sky; everything else, objects included,
is vertical); the dataset then says so in ``label_source``, and scores on it are not the paper's.

``labels="both"`` (the two-headed net) yields ``(image, (2, H, W) mask)``: channel 0 semantic, channel 1
geometric, one tv_tensors.Mask so every paired transform moves both alike; ``.heads`` names them in order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..record import default_palette
from ..errors import FcnsegError
from .base import IGNORE_INDEX, SegmentationDataset, check_split, holdout_split, read_list, register_dataset
from .dev import carve
from .io import DataFileError, image_size

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
    fixed ``val_fraction`` held out by ``seed``; ``dev`` (the shipped dev list, a tenth of trainval) and ``fit``
    (train less dev) for choosing on dev and reporting val. ``split_list`` reads the names from a file you give instead.
    ``labels``: 'semantic' (33 classes), 'geometric' (3; from ``geolabels/`` or derived, see ``label_source``) or
    'both' (a (2, H, W) mask per image for the two-headed net; ``SiftFlowBothDataset``)."""
    if labels not in ("semantic", "geometric", "both"):
        raise FcnsegError(f"unknown SIFT Flow labels {labels!r}; valid: semantic, geometric, both")
    if split_list is not None:
        names = read_list(Path(split_list))
    else:
        check_split("siftflow", split, ("train", "val", "trainval", "test", "dev", "fit"))
        names = read_list(root / ("test.txt" if split == "test" else "trainval.txt"))
        if split in ("train", "val", "dev", "fit"):
            names = holdout_split(names, "val" if split == "val" else "train", val_fraction, seed)
        if split in ("dev", "fit"):
            names = carve("siftflow", split, names)
    classes, source, folder = SIFTFLOW_CLASSES, "semantic label files", "labels"
    value_map = {0: IGNORE_INDEX} | {v: v - 1 for v in range(1, len(SIFTFLOW_CLASSES) + 1)}
    if labels == "both":
        files = [(root / "images" / f"{n}.jpg", root / "labels" / f"{n}.png") for n in names]
        geo_files = (root / "geolabels").is_dir()
        dataset = SiftFlowBothDataset(name="siftflow", root=root, split=split, files=files, names=names,
                                      classes=classes, colors=default_palette(len(classes) + 1)[1:],
                                      transforms=transforms, value_map=value_map, skip_bad=skip_bad,
                                      geolabels=geo_files)
        return dataset
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


class SiftFlowBothDataset(SegmentationDataset):
    """SIFT Flow with both label maps per image, stacked as a (2, H, W) mask: semantic, then geometric
    (from ``geolabels/<name>.png`` when the copy has that folder, else derived with ``SIFTFLOW_GEOMETRY``)."""

    def __init__(self, *, geolabels: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.geolabels = geolabels
        geo_source = "geometric label files" if geolabels else DERIVED
        palette = default_palette(len(GEOMETRIC_CLASSES) + 1)[1:]
        #: the label maps in mask-channel order: classes, colours and where each comes from
        self.heads = {"semantic": {"classes": list(SIFTFLOW_CLASSES), "colors": self.colors,
                                   "label_source": "semantic label files"},
                      "geometric": {"classes": list(GEOMETRIC_CLASSES), "colors": palette, "label_source": geo_source}}
        self.label_source = {name: head["label_source"] for name, head in self.heads.items()}
        # semantic id (0..32, 255) -> geometric id (0..2, 255); the geolabels/ files' raw values: 0 void, 1..3
        self._to_geometry = np.full(256, IGNORE_INDEX, np.uint8)
        for i, c in enumerate(SIFTFLOW_CLASSES):
            self._to_geometry[i] = GEOMETRIC_CLASSES.index(SIFTFLOW_GEOMETRY[c])
        self._geo_lut = np.full(256, IGNORE_INDEX, np.uint8)
        self._geo_lut[1:4] = [0, 1, 2]

    def load(self, index: int):
        """(PIL image, uint8 (2, H, W) class ids: semantic, geometric); bad files raise DataFileError."""
        image, semantic = super().load(index)
        sem = np.asarray(semantic)
        if not self.geolabels:
            geo = self._to_geometry[sem]
        else:
            path = self.root / "geolabels" / f"{self.names[index]}.png"
            if not path.is_file():
                raise DataFileError(f"{path}: missing geometric labels for sample {self.names[index]!r}")
            raw = self.read_mask(path)
            if raw.ndim != 2 or raw.shape != sem.shape:
                raise DataFileError(f"{path}: geometric labels are {raw.shape[::-1]} but the image is "
                                    f"{image_size(image)}; expected one channel of its size")
            outside = np.isin(raw, [0, 1, 2, 3, IGNORE_INDEX], invert=True)
            if outside.any():
                bad = np.unique(raw[outside])[:8].tolist()
                raise DataFileError(f"{path}: geometric label values {bad} are outside 0 (void), 1..3 and 255")
            geo = self._geo_lut[raw]
        return image, np.stack([sem, geo])
