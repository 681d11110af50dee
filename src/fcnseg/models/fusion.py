"""RGB-D fusion (paper section 5, NYUDv2): early fusion widens conv1 to 4 channels; late fusion sums two FCNs' scores.

Early fusion: the first convolution that reads the image gets a fourth input channel whose filter
is the mean of the RGB filters (so a depth map normalised like the colour channels starts with the
response a grey image of the same values would give) and the RGB filters stay as they are.

Late fusion: an RGB FCN and an HHA FCN (data/hha.py), each a full net, see their own three channels of
a 6-channel RGB+HHA input (``nyudv2`` with ``modality="rgbhha"``) and their final scores are summed;
train the pair jointly, or build it from two single-stream checkpoints.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import FcnsegError


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent, attribute name, conv) of the first Conv2d in registration order: the one that reads the image."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise FcnsegError(f"{type(model).__name__} has no convolution to widen")


def widen_input(model: nn.Module, extra_channels: int = 1) -> nn.Module:
    """Give ``model``'s first convolution ``extra_channels`` more inputs, *in place* (for a model being
    built: ``FCN(..., in_channels=4)``); each new filter starts as the mean of the three RGB filters."""
    parent, attr, old = _first_conv(model)
    if old.in_channels != 3:
        raise FcnsegError(f"the first convolution reads {old.in_channels} channels; early fusion widens an RGB net")
    if extra_channels < 1:
        raise FcnsegError(f"early fusion adds at least one channel; got {extra_channels}")
    new = nn.Conv2d(3 + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode, device=old.weight.device,
                    dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:, :3] = old.weight
        new.weight[:, 3:] = old.weight.mean(1, keepdim=True)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    setattr(parent, attr, new)
    return model


def early_fusion(model: nn.Module, extra_channels: int = 1) -> nn.Module:
    """A copy of a built (e.g. trained RGB) ``model`` that takes RGB plus ``extra_channels`` (depth)
    inputs; ``model`` is not changed. A checkpoint of the copy records ``in_channels`` so that
    ``load_checkpoint`` rebuilds it (``FCN(..., in_channels=...)``)."""
    _, _, conv = _first_conv(model)
    if conv.in_channels != 3:
        raise FcnsegError(f"the first convolution reads {conv.in_channels} channels; early fusion widens an RGB net")
    fused = widen_input(copy.deepcopy(model), extra_channels)
    fused.in_channels = 3 + extra_channels
    if isinstance(getattr(fused, "build_kwargs", None), dict):
        fused.build_kwargs = {**fused.build_kwargs, "in_channels": 3 + extra_channels}
    return fused


class LateFusionFCN(nn.Module):
    """Two FCNs on an (B, 6, H, W) RGB+HHA input: ``rgb_model`` sees channels 0-2, ``hha_model`` 3-5,
    their (B, K, H, W) logits are summed."""

    def __init__(self, rgb_model: nn.Module, hha_model: nn.Module):
        super().__init__()
        k_rgb, k_hha = getattr(rgb_model, "num_classes", None), getattr(hha_model, "num_classes", None)
        if k_rgb is None or k_rgb != k_hha:
            raise FcnsegError(f"late fusion needs two models with the same classes; got {k_rgb} and {k_hha}")
        self.rgb, self.hha = rgb_model, hha_model
        self.num_classes = k_rgb
        self.top_stride = max(getattr(rgb_model, "top_stride", 32), getattr(hha_model, "top_stride", 32))
        self.in_channels = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 6:
            raise FcnsegError(f"late fusion takes (B, 6, H, W) RGB+HHA input; got shape {tuple(x.shape)}")
        return self.rgb(x[:, :3]) + self.hha(x[:, 3:])  # (B, K, H, W)
