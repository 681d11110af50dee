"""Paired image/mask transforms built from torchvision.transforms.v2 on tv_tensors, and per-dataset presets.

Images are tv_tensors.Image, masks tv_tensors.Mask, so every geometric op moves both the same way and
v2 resamples masks with nearest neighbour only; photometric ops and normalisation touch images only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..record import IMAGENET_MEAN, IMAGENET_STD, PairedTransform
from ..errors import FcnsegError

IGNORE_INDEX = 255  # the mask value of unlabelled pixels: no loss, no score

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
