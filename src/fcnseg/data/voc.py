"""PASCAL VOC 2011/2012 segmentation and SBD, with the FCN paper's splits (SBD train, seg11valid).

``root`` holds the archives as they extract::

    root/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}   (also VOC2011,
                                                  or TrainVal/VOCdevkit/VOC2011 as the 2011 tar extracts)
    root/benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}                     SBD

Splits: ``train``/``val``/``trainval`` (VOC ``year``), ``sbd_train`` (8,498) / ``sbd_val`` (2,857), and
``seg11valid``: VOC2011 segmentation val minus SBD train (736 images), the paper's validation set.
Its names come from VOC2011's val.txt, or from ``root/seg11valid.txt`` when you have that list instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..record import default_palette
from ..errors import FcnsegError
from .base import IGNORE_INDEX, SegmentationDataset, check_split, read_list, register_dataset
from .io import DataFileError

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
VOC_SPLITS = ("train", "val", "trainval", "sbd_train", "sbd_val", "seg11valid")


def find_voc(root: Path, year: str, required: bool = True) -> Path | None:
    """``VOCdevkit/VOC{year}`` under ``root`` (or ``root`` itself when it is that folder)."""
    for cand in (root / "VOCdevkit" / f"VOC{year}", root / "TrainVal" / "VOCdevkit" / f"VOC{year}",
                 root / f"VOC{year}", root):
        if cand.name == f"VOC{year}" and (cand / "JPEGImages").is_dir() \
                and (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    if required:
        raise FcnsegError(f"{root}: no VOCdevkit/VOC{year} with JPEGImages and ImageSets/Segmentation; "
                          f"'fcnseg data download voc{year} --root {root}' fetches it")
    return None


def find_sbd(root: Path) -> Path:
    for cand in (root / "benchmark_RELEASE" / "dataset", root / "SBD" / "dataset", root / "dataset"):
        if (cand / "img").is_dir() and (cand / "cls").is_dir():
            return cand
    raise FcnsegError(f"{root}: no SBD benchmark_RELEASE/dataset with img/ and cls/; "
                      f"'fcnseg data download sbd --root {root}' fetches it")


def read_sbd_mat(path: Path) -> np.ndarray:
    """Class ids from an SBD ``cls/*.mat`` (``GTcls.Segmentation``, 0 background, 1..20)."""
    from scipy.io import loadmat

    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: empty mask file (0 bytes)")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError):
        raise DataFileError(f"{path}: not an SBD class mask (no GTcls.Segmentation)") from None
    except Exception as e:  # scipy raises several types (ValueError, MatReadError, OSError) for damaged files
        raise DataFileError(f"{path}: unreadable mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if seg.ndim != 2 or seg.dtype.kind not in "ui":
        raise DataFileError(f"{path}: GTcls.Segmentation is {seg.dtype} {seg.shape}; expected a 2-D integer map")
    if seg.dtype.kind == "i" and seg.size and seg.min() < 0:
        raise DataFileError(f"{path}: mask holds negative values; expected class ids >= 0")
    return seg.astype(np.uint16 if seg.max(initial=0) > 255 else np.uint8)


class VOCSegmentation(SegmentationDataset):
    """VOC palette PNGs and SBD .mat masks in one class; both use ids 0..20 and 255 for borders."""

    def read_mask(self, path: Path) -> np.ndarray:
        if path.suffix == ".mat":
            return read_sbd_mat(path)
        return super().read_mask(path)


@register_dataset("voc")
def voc(root: Path, split: str, transforms=None, skip_bad: bool = False, year: str = "2012") -> SegmentationDataset:
    check_split("voc", split, VOC_SPLITS)
    if split in ("sbd_train", "sbd_val"):
        sbd = find_sbd(root)
        names = read_list(sbd / f"{split[4:]}.txt")
        files = [(sbd / "img" / f"{n}.jpg", sbd / "cls" / f"{n}.mat") for n in names]
    else:
        if split == "seg11valid":
            voc11 = find_voc(root, "2011", required=False)
            listed = root / "seg11valid.txt"
            if listed.is_file():
                names = read_list(listed)
            elif voc11 is not None:
                sbd_train = set(read_list(find_sbd(root) / "train.txt"))
                names = [n for n in read_list(voc11 / "ImageSets" / "Segmentation" / "val.txt") if n not in sbd_train]
            else:
                raise FcnsegError(f"{root}: seg11valid needs VOC2011's val list (VOCdevkit/VOC2011, from "
                                  f"'fcnseg data download voc2011') or a seg11valid.txt in the root")
            # VOC2012's segmentation set contains VOC2011's, so either folder has the files
            base = find_voc(root, year, required=False) or voc11 or find_voc(root, year)
        else:
            base = find_voc(root, year)
            names = read_list(base / "ImageSets" / "Segmentation" / f"{split}.txt")
        files = [(base / "JPEGImages" / f"{n}.jpg", base / "SegmentationClass" / f"{n}.png") for n in names]
    value_map = {i: i for i in range(len(VOC_CLASSES))}
    return VOCSegmentation(name="voc", root=root, split=split, files=files, names=names, classes=VOC_CLASSES,
                           colors=default_palette(len(VOC_CLASSES)), transforms=transforms, value_map=value_map,
                           skip_bad=skip_bad)
