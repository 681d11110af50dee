"""Datasets, paired transforms, data checks and downloads.

``build_dataset(name, root, split)`` gives ``(image, mask)`` pairs: image float32 (C, H, W) normalised,
mask int64 (H, W) with 255 = ignore; ``build_transforms(name, train)`` the matching presets.
"""
from . import camvid, folder, nyudv2, siftflow, voc  # noqa: F401  (register the families)
from .base import IGNORE_INDEX, SegmentationDataset, build_dataset, list_datasets, register_dataset
from .io import DataFileError
from .transforms import PRESETS, build_transforms

__all__ = ["IGNORE_INDEX", "PRESETS", "DataFileError", "SegmentationDataset", "build_dataset", "build_transforms",
           "list_datasets", "register_dataset"]
