"""The preprocessing of a weight file's inputs, one object for every path: ``PairedTransform`` turns
``(image, mask)`` into the normalised float image and int64 mask a network takes (datasets, evaluation) and
``.batch(images)`` normalises an image batch (``Segmenter``, the service, the ONNX Runtime / OpenVINO paths).
``CheckpointRecord.transforms()`` (and ``Weights.transforms()``) build the evaluation one from a record; the
datasets' training presets (``fcnseg.data.transforms``) add augmentation in front of it."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .errors import FcnsegError

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

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch (B, C, H, W), uint8 or float in [0, 1], normalised: the inference path (``Segmenter``, the
        service, exported models run by a runtime), on ``x``'s device."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"PairedTransform(geometric={self.geometric}, photometric={self.photometric}, mean={self.mean}, std={self.std})"
