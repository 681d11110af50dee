"""Coordinate maps: where a feature cell sits in input-image pixels, so crop offsets are computed.

A map ``Geometry(scale, offset)`` says that cell ``i`` of a feature map is centred on input pixel
``scale * i + offset``. Walking the layers composes the maps, as the Caffe reference's ``coord_map``
did; fusing two maps of the same scale needs the crop ``(offset_b - offset_a) / scale``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch.nn as nn


@dataclass(frozen=True)
class Geometry:
    scale: float = 1.0
    offset: float = 0.0

    def conv(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> "Geometry":
        """Map after a convolution or pooling layer (output cell j is centred on input s*j + c)."""
        centre = (kernel - 1) * dilation / 2 - padding
        return Geometry(self.scale * stride, self.scale * centre + self.offset)

    def deconv(self, kernel: int, stride: int, padding: int) -> "Geometry":
        """Map after a transposed convolution (input cell i feeds output cells centred on s*i + c)."""
        centre = (kernel - 1) / 2 - padding
        return Geometry(self.scale / stride, self.offset - self.scale * centre / stride)


def _pair(v) -> int:
    v = v[0] if isinstance(v, (tuple, list)) else v
    return int(v)


# names of residual shortcuts: they run beside the main path and must not be walked twice
SHORTCUT_NAMES = {"downsample", "shortcut", "skip"}


def walk(module: nn.Module, geo: Geometry = Geometry()) -> Geometry:
    """Compose the coordinate map of ``module``'s main path, in registration order.

    Convolutions and poolings change the map; everything else (activations, norms, 1x1 layers,
    parallel branches that keep alignment) leaves it alone. Shortcut branches are skipped.
    """
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        pad = module.padding
        if isinstance(pad, str):
            if pad != "same" and pad != "valid":
                raise ValueError(f"unsupported padding {pad!r}")
            pad = (_pair(module.kernel_size) - 1) // 2 if pad == "same" else 0
        dilation = _pair(getattr(module, "dilation", 1))
        stride = _pair(module.stride) if module.stride is not None else _pair(module.kernel_size)
        return geo.conv(_pair(module.kernel_size), stride, _pair(pad), dilation)
    if isinstance(module, nn.ConvTranspose2d):
        return geo.deconv(_pair(module.kernel_size), _pair(module.stride), _pair(module.padding))
    for name, child in module.named_children():
        if name in SHORTCUT_NAMES:
            continue
        geo = walk(child, geo)
    # timm's same-padding layers pad dynamically; they keep the k/2 centring of a 'same' conv
    return geo


def walk_all(modules: Iterable[nn.Module], geo: Geometry = Geometry()) -> Geometry:
    for m in modules:
        geo = walk(m, geo)
    return geo


def crop_offset(upsampled: Geometry, target: Geometry) -> int:
    """Cells to skip in ``upsampled`` so that it lines up with ``target`` (floored).

    Negative when ``target`` is the larger map and must itself be cropped by the opposite amount
    (the VGG nets' pool4 and pool3 scores are larger than the upsampled coarse scores).
    """
    if not math.isclose(upsampled.scale, target.scale):
        raise ValueError(f"cannot align maps of scale {upsampled.scale} and {target.scale}")
    shift = (target.offset - upsampled.offset) / target.scale
    return int(math.floor(shift + 1e-6)) if shift >= 0 else -int(math.floor(-shift + 1e-6))


def spatial_layers(module: nn.Module) -> Iterator[nn.Module]:
    """Convolutions and poolings of the main path, in registration order (shortcut branches skipped)."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.ConvTranspose2d)):
        yield module
        return
    for name, child in module.named_children():
        if name not in SHORTCUT_NAMES:
            yield from spatial_layers(child)
