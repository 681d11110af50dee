"""NYU Depth v2, 40-class task (Gupta et al. 2013): RGB or RGB-D inputs for the paper's early fusion.

On-disk layout (numbers as in the 1,449 labelled frames; 795 train / 654 test)::

    root/image/NNNN.png     RGB, 8-bit
    root/depth/NNNN.png     depth, 16-bit PNG in millimetres (0 = no measurement)
    root/label40/NNNN.png   single-channel ids: 0 void, 1..40 the classes below
    root/train.txt, root/test.txt   sample names (NNNN), one per line

``modality="rgbd"`` gives a 4-channel image: RGB in [0, 1] and depth in metres, normalised with
``DEPTH_MEAN``/``DEPTH_STD`` as the fourth channel (``dataset.mean``/``dataset.std`` hold all four).
``modality="hha"`` gives the 3-channel HHA encoding of the depth (data/hha.py) in [0, 1], normalised
like an ImageNet image (the paper's HHA stream starts from ImageNet weights); ``"rgbhha"`` gives RGB and
HHA stacked (6 channels) for late fusion (models/fusion.py). HHA is computed once per depth file and
cached under ``hha_cache`` (default ``~/.cache/fcnseg/hha``), keyed by the file's content.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from ..record import IMAGENET_MEAN, IMAGENET_STD, default_palette
from ..errors import FcnsegError
from .base import IGNORE_INDEX, SegmentationDataset, check_split, read_list, register_dataset
from .hha import NYUDV2_INTRINSICS, cached_hha
from .io import DataFileError, read_depth, read_image

NYUDV2_CLASSES = ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                  "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
                  "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
                  "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
                  "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop"]
# typical indoor Kinect depth (metres): centres the fourth channel roughly like the ImageNet-normalised RGB
DEPTH_MEAN, DEPTH_STD = 2.8, 1.4
MODALITIES = ("rgb", "rgbd", "hha", "rgbhha")
DEFAULT_HHA_CACHE = Path.home() / ".cache" / "fcnseg" / "hha"


class NYUDv2(SegmentationDataset):
    """Adds the depth file per sample (``.depth_files``) and the 4-channel RGB-D image."""

    def __init__(self, *, modality: str, depth_files: list[Path], hha_cache: Path = DEFAULT_HHA_CACHE,
                 intrinsics=NYUDV2_INTRINSICS, **kwargs) -> None:
        self.modality = modality
        self.hha_cache, self.intrinsics = Path(hha_cache), tuple(intrinsics)
        self._depth_by_image = {f[0]: d for f, d in zip(kwargs["files"], depth_files)}
        if modality != "rgb":
            missing = [f"{d}: missing depth map for sample {n!r}" for d, n in zip(depth_files, kwargs["names"])
                       if not d.is_file()]
            kwargs["problems"] = list(kwargs.get("problems") or []) + missing
            bad = {Path(m.split(": ", 1)[0]).stem for m in missing}
            keep = [i for i, n in enumerate(kwargs["names"]) if n not in bad]
            kwargs["files"] = [kwargs["files"][i] for i in keep]
            kwargs["names"] = [kwargs["names"][i] for i in keep]
        super().__init__(**kwargs)
        self.depth_files = [self._depth_by_image[f[0]] for f in self.files]

    def load_image(self, index: int):
        image = read_image(self.files[index][0])
        if self.modality == "rgb":
            return image
        path = self.depth_files[index]
        if self.modality == "rgbd":
            extra = torch.from_numpy(np.ascontiguousarray(read_depth(path)))[None]  # (1, H, W) metres
        else:
            hha = cached_hha(path, self.hha_cache, self.intrinsics)  # (H, W, 3) uint8
            # a copy: an array read from the cache is read-only
            extra = torch.from_numpy(np.array(hha)).permute(2, 0, 1).float() / 255
        if tuple(extra.shape[-2:]) != (image.height, image.width):
            raise DataFileError(f"{path}: depth map is {extra.shape[-1]}x{extra.shape[-2]} but its image "
                                f"{self.files[index][0]} is {image.width}x{image.height}")
        if self.modality == "hha":
            return extra
        rgb = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        return torch.cat([rgb, extra])


@register_dataset("nyudv2")
def nyudv2(root: Path, split: str, transforms=None, skip_bad: bool = False, modality: str = "rgb",
           hha_cache: str | Path = DEFAULT_HHA_CACHE, intrinsics=NYUDV2_INTRINSICS) -> SegmentationDataset:
    """Splits ``train`` (795) and ``test`` (654) from ``root/{split}.txt``; ``modality`` one of ``MODALITIES``;
    ``intrinsics`` (fx, fy, cx, cy) of the depth camera for HHA (default: the NYU toolbox's)."""
    check_split("nyudv2", split, ("train", "test"))
    if modality not in MODALITIES:
        raise FcnsegError(f"unknown modality {modality!r} for nyudv2; valid: {', '.join(MODALITIES)}")
    names = read_list(root / f"{split}.txt")
    files = [(root / "image" / f"{n}.png", root / "label40" / f"{n}.png") for n in names]
    depth_files = [root / "depth" / f"{n}.png" for n in names]
    value_map = {0: IGNORE_INDEX} | {v: v - 1 for v in range(1, len(NYUDV2_CLASSES) + 1)}
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if modality == "rgbd":
        mean, std = (*IMAGENET_MEAN, DEPTH_MEAN), (*IMAGENET_STD, DEPTH_STD)
    elif modality == "rgbhha":
        mean, std = (*IMAGENET_MEAN, *IMAGENET_MEAN), (*IMAGENET_STD, *IMAGENET_STD)
    return NYUDv2(name="nyudv2", root=root, split=split, files=files, names=names, classes=NYUDV2_CLASSES,
                  colors=default_palette(len(NYUDV2_CLASSES) + 1)[1:], transforms=transforms, value_map=value_map,
                  skip_bad=skip_bad, mean=mean, std=std, modality=modality, depth_files=depth_files,
                  hha_cache=Path(hha_cache).expanduser(), intrinsics=intrinsics)
