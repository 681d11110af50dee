"""Upsampling: one bilinear-kernel function and one module with three modes (deconv, bilinear, resize_conv)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import Geometry

UpsampleMode = Literal["deconv", "bilinear", "resize_conv"]
UPSAMPLE_MODES = ("deconv", "bilinear", "resize_conv")
#: a full class x class deconvolution beyond this is refused (its bilinear start is diagonal anyway)
MAX_DECONV_BYTES = 2**30


def bilinear_kernel(size: int) -> torch.Tensor:
    """2-D bilinear interpolation kernel of ``size`` x ``size`` (the FCN reference's upsample_filt)."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - centre).abs() / factor
    return (filt[:, None] * filt[None, :]).float()


def bilinear_weight(in_channels: int, out_channels: int, size: int) -> torch.Tensor:
    """Weight for ConvTranspose2d that upsamples each channel on its own (identity across channels)."""
    w = torch.zeros(in_channels, out_channels, size, size)
    k = bilinear_kernel(size)
    for i in range(min(in_channels, out_channels)):
        w[i, i] = k
    return w


class Upsample(nn.Module):
    """Upsample by an integer ``factor`` with a kernel of 2*factor, stride factor, no padding (the paper).

    mode='deconv': a full ConvTranspose2d initialised to exact bilinear interpolation; it learns
    unless ``learnable=False``. mode='bilinear': the same kernel applied per channel, fixed (the
    reference release froze its upsampling). mode='resize_conv': fixed bilinear resize followed by a
    3x3 convolution initialised to identity, the usual cure for checkerboard artefacts.
    All modes share one geometry, so crop offsets do not depend on the mode.
    """

    def __init__(self, channels: int, factor: int, mode: UpsampleMode = "deconv", learnable: bool = True,
                 bias: bool = False):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsample mode {mode!r}; valid modes: {', '.join(UPSAMPLE_MODES)}")
        self.channels, self.factor, self.mode = channels, factor, mode
        self.kernel_size = 2 * factor
        if mode == "deconv":
            size = channels * channels * self.kernel_size ** 2 * 4
            if size > MAX_DECONV_BYTES:  # e.g. keep_fc8's 1000 classes at 32x: 16 GB, and an OOM kill
                raise ValueError(f"a learned {channels}x{channels}x{self.kernel_size}x{self.kernel_size} deconvolution "
                                 f"needs {size / 2**30:.1f} GiB; for this many classes use upsample='bilinear' "
                                 f"(fixed, per class) or 'resize_conv'")
            self.deconv = nn.ConvTranspose2d(channels, channels, self.kernel_size, stride=factor, bias=bias)
            with torch.no_grad():
                self.deconv.weight.copy_(bilinear_weight(channels, channels, self.kernel_size))
                if bias:
                    self.deconv.bias.zero_()
            self.deconv.requires_grad_(learnable)
        else:
            self.register_buffer("kernel", bilinear_kernel(self.kernel_size)[None, None].repeat(channels, 1, 1, 1))
            if mode == "resize_conv":
                self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
                with torch.no_grad():
                    nn.init.dirac_(self.conv.weight)
                    self.conv.bias.zero_()
                self.conv.requires_grad_(learnable)

    def geometry(self, geo: Geometry) -> Geometry:
        return geo.deconv(self.kernel_size, self.factor, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "deconv":
            return self.deconv(x)
        y = F.conv_transpose2d(x, self.kernel.to(x.dtype), stride=self.factor, groups=self.channels)
        if self.mode == "resize_conv":
            y = self.conv(y)
        return y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}, mode={self.mode!r}"
