"""The FCN model: backbone features by stride -> fc6/fc7 as convolutions -> score -> upsample and fuse skips.

``FCN`` is the one place where a network is composed. Crop offsets for every fusion and for the
final output are computed from the layers' coordinate maps (see geometry.py), never typed in.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .backbones import Backbone
from .convolutionalize import fc_to_conv
from .fusion import widen_input
from .geometry import Geometry, crop_offset
from .upsample import UnpoolDecoder, Upsample, UpsampleMode


class ConvClassifier(nn.Module):
    """fc6 and fc7 as convolutions (k x k then 1 x 1), each followed by ReLU and dropout."""

    def __init__(self, in_channels: int, channels: int = 4096, kernel: int = 7, dropout: float = 0.5):
        super().__init__()
        self.kernel = kernel
        self.fc6 = nn.Conv2d(in_channels, channels, kernel)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d(dropout)
        self.fc7 = nn.Conv2d(channels, channels, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d(dropout)
        self.out_channels = channels

    def load_classifier(self, fc6: tuple[torch.Tensor, torch.Tensor], fc7: tuple[torch.Tensor, torch.Tensor],
                        in_channels: int) -> None:
        """Copy an ImageNet classifier's fc6 and fc7 ``(weight, bias)`` in, reshaped to convolutions."""
        for conv, (weight, bias), channels, kernel in ((self.fc6, fc6, in_channels, self.kernel),
                                                       (self.fc7, fc7, fc7[0].shape[1], 1)):
            conv.load_state_dict(fc_to_conv({"weight": weight, "bias": bias}, channels, kernel).state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop6(self.relu6(self.fc6(x)))
        return self.drop7(self.relu7(self.fc7(x)))


def _crop(x: torch.Tensor, offset: int, like_h, like_w) -> torch.Tensor:
    return x[:, :, offset:offset + like_h, offset:offset + like_w]


class FCN(nn.Module):
    """Fully convolutional network over any ``Backbone``.

    ``skips`` lists the strides fused on the way up: () is FCN-32s, (16,) FCN-16s, (16, 8) FCN-8s.
    ``skip_scales`` multiplies each skip feature before scoring (the at-once net's 0.01 / 0.0001).
    ``fc_channels=0`` drops fc6/fc7 and scores the deepest features directly (light backbones, GoogLeNet).
    ``upsample='unpool'`` (no skips) upsamples by reversing the backbone's max poolings (``UnpoolDecoder``).
    ``in_channels=4``: RGB-D early fusion (the backbone's first convolution widened, see fusion.py).
    """

    def __init__(self, backbone: Backbone, num_classes: int, skips: Sequence[int] = (16, 8),
                 fc_channels: int = 4096, fc_kernel: int = 7, dropout: float = 0.5,
                 upsample: UpsampleMode = "deconv", learnable_upsample: bool = True,
                 skip_scales: Sequence[float] | None = None, in_channels: int = 3):
        super().__init__()
        top = max(backbone.strides)
        if any(s not in backbone.strides or s >= top for s in skips) or list(skips) != sorted(skips, reverse=True):
            raise ValueError(f"skips {tuple(skips)} must be decreasing strides below {top} from {backbone.strides}")
        if upsample == "unpool" and skips:
            raise ValueError("upsample='unpool' reverses the backbone's poolings from the top stride; use skips=()")
        if in_channels != 3:  # RGB-D early fusion: conv1 widened, new filters = mean RGB filter (fusion.py)
            widen_input(backbone, in_channels - 3)
        self.in_channels = in_channels
        self.backbone = backbone
        self.num_classes = num_classes
        self.top_stride = top
        self.skips = tuple(skips)
        self.skip_scales = tuple(skip_scales) if skip_scales is not None else (1.0,) * len(self.skips)

        geo: Geometry = backbone.geometry[top]
        if fc_channels:
            self.fc = ConvClassifier(backbone.channels[top], fc_channels, fc_kernel, dropout)
            geo = geo.conv(fc_kernel, 1, 0)
            score_in = fc_channels
        else:
            self.fc = nn.Identity()
            score_in = backbone.channels[top]
        self.score_fr = nn.Conv2d(score_in, num_classes, 1)

        # one 2x upsampling and one skip scorer per fused stride; offsets from the coordinate maps
        self.up = nn.ModuleDict()
        self.score_skip = nn.ModuleDict()
        self.skip_offsets: list[int] = []  # > 0: crop the upsampled map; < 0: crop the skip score
        stride = top
        for s in self.skips:
            up = Upsample(num_classes, stride // s, upsample, learnable_upsample)
            geo = up.geometry(geo)
            offset = crop_offset(geo, backbone.geometry[s])
            self.skip_offsets.append(offset)
            geo = backbone.geometry[s] if offset >= 0 else geo  # the fused map keeps the uncropped side's map
            self.up[str(s)] = up
            self.score_skip[str(s)] = nn.Conv2d(backbone.channels[s], num_classes, 1)
            stride = s
        self.score_geometry = geo  # where the cells of ``scores(x)`` sit (models/dense.py aligns dense scores with it)
        if upsample == "unpool":  # the pooling switches, reversed from the top stride (upsample.py)
            self.final_up = UnpoolDecoder(backbone, num_classes, geo, learnable_upsample)
        else:
            self.final_up = Upsample(num_classes, stride, upsample, learnable_upsample)
        self.final_offset = crop_offset(self.final_up.geometry(geo), Geometry())
        if self.final_offset < 0:
            raise ValueError("the upsampled output starts inside the image; the backbone needs input padding")
        self.reset_scores()

    def reset_scores(self) -> None:
        """Score layers start at zero, as in the paper (so a fresh skip changes nothing at first)."""
        for conv in [self.score_fr, *self.score_skip.values()]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def output_stride(self) -> int:
        return min(self.skips) if self.skips else self.top_stride

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores before the final upsampling: (B, K, ~H/s, ~W/s) at s = ``output_stride``."""
        return self.fuse(self.backbone(x))  # {8: (B,C8,H/8,W/8), 16: (B,C16,H/16,W/16), 32: (B,C32,H/32,W/32)}

    def fuse(self, feats: dict[int, torch.Tensor], top: torch.Tensor | None = None) -> torch.Tensor:
        """Score the backbone features and fuse the skips; ``top``: the fc6/fc7 output when a trunk shared
        by several heads has computed it (models/multihead.py)."""
        top = self.fc(feats[self.top_stride]) if top is None else top
        score = self.score_fr(top)  # (B, K, H/32, W/32)
        for s, offset, scale in zip(self.skips, self.skip_offsets, self.skip_scales):
            up = self.up[str(s)](score)  # (B, K, ~H/s, ~W/s)
            skip = feats[s] * scale if scale != 1.0 else feats[s]
            skip = self.score_skip[str(s)](skip)  # (B, K, H/s, W/s)
            if offset >= 0:
                score = _crop(up, offset, skip.shape[-2], skip.shape[-1]) + skip
            else:
                score = up + _crop(skip, -offset, up.shape[-2], up.shape[-1])
        return score

    def logits(self, score: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Scores from ``scores``/``fuse`` to (B, K, h, w) logits: the final upsampling and its computed crop."""
        out = self.final_up(score)  # (B, K, >=H, >=W)
        return _crop(out, self.final_offset, h, w)  # (B, K, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.logits(self.scores(x), h, w)
