"""Paired image/mask transforms built from torchvision.transforms.v2 on tv_tensors, and per-dataset presets.

Images are tv_tensors.Image, masks tv_tensors.Mask, so every geometric op moves both the same way and
v2 resamples masks with nearest neighbour only; photometric ops and normalisation touch images only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..checkpoint import IMAGENET_MEAN, IMAGENET_STD
from ..errors import FcnsegError
from .base import IGNORE_INDEX

try:
    from torchvision.transforms.v2 import query_size
except ImportError:  # torchvision < 0.21
    from torchvision.transforms.v2._utils import query_size


@dataclass(frozen=True)
class Preset:
    """Training augmentation defaults of one dataset; evaluation always keeps the original resolution."""

    crop_size: tuple[int, int] | None  # (H, W); padded with the ignore index where the scaled image is smaller
    scale_range: tuple[float, float]
    jitter: float  # brightness/contrast/saturation strength; 0 turns photometric jitter off


PRESETS: dict[str, Preset] = {
    # CamVid is the CPU training workhorse: full 360x480 crops, mild scale range, light per-sample work
    "camvid": Preset((360, 480), (0.75, 1.5), 0.2),
    "camvid32": Preset((360, 480), (0.5, 1.0), 0.2),  # 720x960 originals, trained at half size and up
    "siftflow": Preset((256, 256), (0.75, 1.5), 0.2),
    "voc": Preset((320, 320), (0.5, 2.0), 0.2),
    "nyudv2": Preset((480, 640), (0.75, 1.5), 0.2),
    "folder": Preset((512, 512), (0.5, 2.0), 0.2),
}


class RandomScale(v2.Transform):
    """Resize every input by one factor drawn uniformly from ``scale_range`` (masks: nearest neighbour)."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.scale_range = (float(lo), float(hi))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()  # torch RNG: DataLoader seeds it per worker
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # v2 dispatches tv_tensors.Mask to resize_mask, which always uses nearest neighbour
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)

    # torchvision < 0.21 called these hooks by their private names
    _get_params, _transform = make_params, transform


class PairedTransform:
    """``(image, mask) -> (float32 (C, H, W) normalised, int64 (H, W))``.

    ``image``: a PIL image, or a (C, H, W) tensor (uint8, or float in [0, 1]; C may be 4 for RGB-D, in
    which case photometric jitter touches the first three channels only). ``mask``: a PIL ``L`` image,
    an ndarray or a tensor of class ids with 255 = ignore.
    """

    def __init__(self, geometric: Sequence[v2.Transform], photometric: v2.Transform | None,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.geometric = v2.Compose(list(geometric)) if geometric else None
        self.photometric = photometric
        self.to_float = v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                                   scale=True)
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))
        self.mean, self.std = tuple(mean), tuple(std)
        # uint8 straight to normalised float in one pass each: (x - 255 mean) / (255 std)
        self._shift = torch.tensor([255.0 * m for m in mean]).reshape(-1, 1, 1)
        self._scale = torch.tensor([255.0 * d for d in std]).reshape(-1, 1, 1)

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(F.pil_to_tensor(image) if isinstance(image, Image.Image) else image)
        if isinstance(mask, Image.Image):
            mask = np.array(mask)  # writable copy for torch
        mask = tv_tensors.Mask(torch.as_tensor(mask))
        if len(self.mean) != image.shape[0]:
            raise FcnsegError(f"transform normalises {len(self.mean)} channels but the image has {image.shape[0]}; "
                              f"pass the dataset's mean/std (dataset.mean, dataset.std) to build_transforms")
        if self.geometric is not None:  # on uint8 where possible: resampling is cheapest there
            image, mask = self.geometric(image, mask)
        if self.photometric is None and image.dtype == torch.uint8:  # evaluation: no jitter in between
            mask = mask.to(torch.int64)
            return (image.as_subclass(torch.Tensor).to(torch.float32).sub_(self._shift).div_(self._scale),
                    mask.as_subclass(torch.Tensor))
        image, mask = self.to_float(image, mask)
        if self.photometric is not None:  # on float: cheaper than v2's uint8 path, and clamped to [0, 1]
            if image.shape[0] == 3:
                image = self.photometric(image)
            else:  # RGB-D: jitter colour, leave depth alone
                rgb = self.photometric(tv_tensors.Image(image[:3]))
                image = tv_tensors.Image(torch.cat([rgb, image[3:]]))
        image = self.normalize(image)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"PairedTransform(geometric={self.geometric}, photometric={self.photometric}, mean={self.mean}, std={self.std})"


def build_transforms(dataset_name: str, train: bool, crop_size: tuple[int, int] | None = None,
                     scale_range: tuple[float, float] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, flip: bool = True,
                     jitter: float | None = None) -> PairedTransform:
    """The training or evaluation preset of a dataset as a ``(PIL image, PIL mask) -> (tensor, tensor)`` callable.

    Training: random scale, random crop padded with the ignore index (image: 0), horizontal flip, colour
    jitter, normalisation. ``crop_size``/``scale_range``/``jitter`` None take the dataset's preset
    (``PRESETS``). Evaluation: normalisation only, at the original resolution.
    """
    if dataset_name not in PRESETS:
        raise FcnsegError(f"no transform preset for dataset {dataset_name!r}; valid names: {', '.join(sorted(PRESETS))}")
    if len(mean) != len(std):
        raise FcnsegError(f"mean has {len(mean)} values but std has {len(std)}")
    if not train:
        return PairedTransform([], None, mean, std)
    preset = PRESETS[dataset_name]
    crop_size = preset.crop_size if crop_size is None else tuple(crop_size)
    scale_range = preset.scale_range if scale_range is None else tuple(scale_range)
    jitter = preset.jitter if jitter is None else jitter
    geometric: list[v2.Transform] = []
    if scale_range != (1.0, 1.0):
        geometric.append(RandomScale(scale_range))
    if crop_size:
        geometric.append(v2.RandomCrop(list(crop_size), pad_if_needed=True,
                                       fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if flip:
        geometric.append(v2.RandomHorizontalFlip(0.5))
    photometric = v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter) if jitter else None
    return PairedTransform(geometric, photometric, mean, std)
