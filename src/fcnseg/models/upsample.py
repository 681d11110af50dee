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


# -- unpooling: the pooling switches put each score back where its maximum came from --------------------


class SwitchMaxPool2d(nn.MaxPool2d):
    """A max pooling that keeps, from its last forward, one switch per pooled cell and its input size,
    for ``UnpoolDecoder``; its output is the plain pooling's.

    Class scores have other channels than the features, so the switch is shared by all channels: the
    position in the window where the features are strongest overall (largest sum of absolute values
    over channels), in ``F.max_pool2d(..., return_indices=True)`` form, (B, 1, h, w).
    ``UnpoolDecoder`` converts a backbone's pools to this class in place (no parameters change) and
    takes the switches back after each use.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = x.detach().abs().sum(1, keepdim=True)  # (B, 1, H, W): where the window is most active
        _, indices = F.max_pool2d(energy, self.kernel_size, self.stride, self.padding, self.dilation,
                                  ceil_mode=self.ceil_mode, return_indices=True)
        self.switches = (indices, x.shape[-2:])
        return super().forward(x)


class Unpool(nn.Module):
    """Reverse one max pooling: each value goes back to its argmax position in the pooling's input
    (``nn.MaxUnpool2d``'s result, zeros elsewhere), then a 3x3 per-class filter initialised to the
    3-tap bilinear kernel spreads it over the pooling window (DeconvNet's unpool + deconvolution).

    The scatter is a ``scatter_reduce(amax)``: the same as ``nn.MaxUnpool2d`` when every switch is
    distinct (tested against it), and deterministic where overlapping windows (3x3 stride 2) chose the
    same input pixel: the larger score is kept there (MaxUnpool2d keeps an arbitrary one, which made
    multi-threaded runs differ).
    """

    def __init__(self, channels: int, learnable: bool = True):
        super().__init__()
        self.fill = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        with torch.no_grad():
            self.fill.weight.copy_(bilinear_weight(channels, channels, 3).transpose(0, 1))
        self.fill.requires_grad_(learnable)

    @staticmethod
    def scatter(x: torch.Tensor, indices: torch.Tensor, size) -> torch.Tensor:
        """(B, K, h, w) values to their switches in a zero (B, K, H, W) map; ``indices`` (B, 1 or K, h, w)
        index the flattened (H, W) plane as ``F.max_pool2d(..., return_indices=True)`` gives them."""
        b, k = x.shape[:2]
        h, w = (int(v) for v in size)
        idx = indices.expand(-1, k, -1, -1).reshape(b, k, -1)
        out = x.new_zeros(b, k, h * w).scatter_reduce(2, idx, x.reshape(b, k, -1), reduce="amax", include_self=False)
        return out.view(b, k, h, w)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size) -> torch.Tensor:
        """``x`` on the pooled grid; ``indices`` and ``size`` (H, W) of the pooling's input (``SwitchMaxPool2d``)."""
        return self.fill(self.scatter(x, indices, size))


def _place(x: torch.Tensor, geo: Geometry, grid: Geometry, size) -> torch.Tensor:
    """``x`` (cells on ``geo``) cropped or edge-padded onto the cells of ``grid`` of ``size``."""
    from .geometry import crop_offset

    start = crop_offset(geo, grid)  # cells of x before the grid's first cell (< 0: x starts inside it)
    pads = []
    for n, dim in ((size[1], -1), (size[0], -2)):
        pads += [max(-start, 0), max(n - (x.shape[dim] - start), 0)]
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    s = max(start, 0)
    return x[:, :, s:s + size[0], s:s + size[1]]


class UnpoolDecoder(nn.Module):
    """Upsampling by unpooling: from the coarse scores back to the input grid, reversing the backbone's
    max poolings in turn with their switches (``Unpool``); strides that no pooling made (strided
    convolutions: ResNet's, AlexNet's conv1) are bridged by fixed bilinear upsampling (``Upsample``).
    Every step lands on the exact cells of the layer it reverses (placed by the coordinate maps).

    ``backbone``: its max poolings with stride > 1 are turned into ``SwitchMaxPool2d`` (in place, no
    weights change). ``score_geometry``: where the coarse score cells sit.
    """

    def __init__(self, backbone: nn.Module, channels: int, score_geometry: Geometry, learnable: bool = True):
        super().__init__()
        from .geometry import spatial_layers
        from .geometry import walk

        self.channels, self.score_geometry = channels, score_geometry
        geo, pools = Geometry(), []
        for m in spatial_layers(backbone):
            after = walk(m, geo)
            if isinstance(m, nn.MaxPool2d) and after.scale > geo.scale:
                m.__class__ = SwitchMaxPool2d
                pools.append((m, geo, after))
            geo = after
        if not pools:
            raise ValueError(f"{type(backbone).__name__} has no max pooling to reverse; use another upsample mode")
        self._pools = pools[::-1]  # deepest first; plain list: the pools belong to the backbone
        self.unpool = nn.ModuleList(Unpool(channels, learnable) for _ in pools)
        self.bridge = nn.ModuleDict()  # bilinear steps between pools, keyed by their position
        geo = score_geometry
        for i, (_, into, out) in enumerate(self._pools):
            if geo.scale > out.scale:
                self.bridge[str(i)] = Upsample(channels, round(geo.scale / out.scale), "bilinear", learnable=False)
            geo = into
        self.last = Upsample(channels, round(geo.scale), "bilinear", learnable=False) if geo.scale > 1 else None
        self.out_geometry = self.last.geometry(geo) if self.last is not None else geo

    def geometry(self, geo: Geometry) -> Geometry:
        if geo != self.score_geometry:
            raise ValueError("UnpoolDecoder was built for another score map")
        return self.out_geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geo = self.score_geometry
        for i, (pool, into, out) in enumerate(self._pools):
            if str(i) in self.bridge:
                x = self.bridge[str(i)](x)  # (B, K, ~pool output size)
                geo = self.bridge[str(i)].geometry(geo)
            indices, size = pool.switches
            del pool.switches  # one forward's switches are used once; do not keep them alive
            x = _place(x, geo, out, indices.shape[-2:])  # the exact cells of the pooled map
            x = self.unpool[i](x, indices, size)  # (B, K, pooling input size)
            geo = into
        return self.last(x) if self.last is not None else x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, poolings={len(self._pools)}"
