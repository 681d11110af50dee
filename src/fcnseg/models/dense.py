"""Dense output from a strided net without upsampling: shift-and-stitch and filter rarefaction (paper section 3.2).

A net with output stride ``S`` scores one cell per ``S x S`` input pixels. Two ways make it score
every ``t``-th pixel instead (``t`` divides ``S``, ``F = S / t``):

* **Shift-and-stitch** (:func:`shift_and_stitch`) runs the net ``F**2`` times, on the input moved
  up by ``a*t`` rows and left by ``b*t`` columns for ``a, b in 0..F-1``, and interlaces the
  ``F**2`` coarse outputs: pass ``(a, b)`` fills the dense cells ``(F*i + a, F*j + b)``.
  The rows and columns moved out at the bottom/right are filled with zeros (the mean colour after
  normalisation). Cost: ``F**2`` full passes.
* **Filter rarefaction** (:func:`rarefy`) copies the net, sets the stride of every strided layer
  past cumulative stride ``t`` to 1 and dilates every later convolution and pooling window by the
  product of the strides removed before it (padding scaled alike), so one pass gives the dense
  output ("a trous", or dilated, convolution). Same weights; no architecture is rewritten by hand.

Both put dense cell ``q`` on input pixel ``t*q + c``, where ``c`` is the original net's
coordinate-map offset (see geometry.py), and they agree exactly on the *interior*.

Borders, exactly: the dense cell ``q`` of pass ``r = q mod F`` (per axis) reads the input window
``[t*q + c - R/2, t*q + c + R/2]`` (``R`` = :func:`receptive_field`). Shift-and-stitch's pass
``r`` sees only the pixels from ``r*t`` on (the first ``r*t`` rows/columns were shifted out, and
its layers zero-pad where the rarefied net still sees real pixels or features); both nets
zero-pad differently past the bottom/right edge (the shifted pass has ``r*t`` zero pixels that go
through every layer and its BN/ReLU, the rarefied net pads each layer's own input). So the two
outputs agree to float tolerance wherever that window lies inside ``[r*t, H)`` on both axes
(use ``[(F-1)*t, H)`` for a bound that holds for every cell, as :func:`interior` does) and may
differ elsewhere. A rarefied ceil-mode max pooling pads its bottom/right with -inf so it keeps the
partial windows of the original; with non-zero pool padding it then has a few extra border cells.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FcnsegError
from ..record import CheckpointRecord
from .geometry import SHORTCUT_NAMES, Geometry, crop_offset, spatial_layers
from .upsample import Upsample

log = logging.getLogger(__name__)

DenseMethod = Literal["shift-and-stitch", "rarefaction"]
DENSE_METHODS = ("shift-and-stitch", "rarefaction")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _square(v, what: str, module: nn.Module) -> int:
    a, b = _pair(v)
    if a != b:
        raise FcnsegError(f"{type(module).__name__}: {what} {a}x{b} is not square; dense outputs need equal strides")
    return a


def receptive_field(module: nn.Module) -> tuple[int, int]:
    """(receptive field in input pixels, output stride) of ``module``'s main path, walked in registration order."""
    rf, jump = 1, 1
    for m in spatial_layers(module):
        if isinstance(m, nn.ConvTranspose2d):
            raise FcnsegError("receptive_field: a transposed convolution has no single receptive field here")
        k = _square(m.kernel_size, "kernel", m)
        d = _square(getattr(m, "dilation", 1), "dilation", m)
        s = _square(m.stride if m.stride is not None else m.kernel_size, "stride", m)
        rf += (k - 1) * d * jump
        jump *= s
    return rf, jump


def shift_and_stitch(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, stride: int,
                     target_stride: int = 1) -> torch.Tensor:
    """Dense output of ``net`` (output stride ``stride``) at ``target_stride``, in ``(stride/target_stride)**2`` passes.

    ``x``: (B, C, H, W). Returns (B, K, F*h, F*w) where (B, K, h, w) is one pass's output and
    ``F = stride // target_stride``; cell ``q`` sits on input pixel ``target_stride*q + c`` (``c`` the
    net's own offset). Pass ``(a, b)`` sees ``x`` moved up by ``a*target_stride`` rows and left by
    ``b*target_stride`` columns, zeros in the vacated bottom rows / right columns.
    """
    if x.dim() != 4:
        raise FcnsegError(f"shift_and_stitch: input must be (B, C, H, W); got shape {tuple(x.shape)}")
    if target_stride < 1 or stride % target_stride:
        raise FcnsegError(f"shift_and_stitch: target stride {target_stride} must divide the net's stride {stride}")
    f = stride // target_stride
    log.debug("shift-and-stitch: %d passes of the stride-%d net", f * f, stride)
    dense = None
    for a in range(f):
        for b in range(f):
            dy, dx = a * target_stride, b * target_stride
            shifted = F.pad(x[:, :, dy:, dx:], (0, dx, 0, dy))  # same size, so every pass has the same grid
            out = net(shifted)  # (B, K, h, w)
            if dense is None:
                dense = out.new_empty(out.shape[0], out.shape[1], f * out.shape[2], f * out.shape[3])
            dense[:, :, a::f, b::f] = out
    return dense


class _RarefiedMaxPool(nn.Module):
    """A stride-1 dilated max pooling that pads its own border with -inf: the rarefied form of a
    (possibly ceil-mode) max pooling. Explicit padding because nn.MaxPool2d limits padding to half
    the kernel, and the extra bottom/right -inf keeps a ceil-mode pool's partial windows."""

    def __init__(self, pool: nn.MaxPool2d, factor: int):
        super().__init__()
        self.kernel_size = _square(pool.kernel_size, "kernel", pool)
        self.dilation = _square(pool.dilation, "dilation", pool) * factor
        pad = _square(pool.padding, "padding", pool) * factor
        extra = (self.kernel_size - 1) * self.dilation if pool.ceil_mode else 0
        self.pad = (pad, pad + extra, pad, pad + extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, 1, 0, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, dilation={self.dilation}, pad={self.pad}"


class _Rarefier:
    """Walks a (copied) module in registration order and rewrites its layers in place."""

    def __init__(self, target_stride: int):
        self.target = target_stride
        self.stride = 1  # cumulative stride of the original net so far
        self.factor = 1  # product of the strides removed so far: the dilation of what follows
        self.removed = 0

    def visit(self, module: nn.Module) -> None:
        entry = (self.stride, self.factor)
        for name, child in list(module.named_children()):
            if name in SHORTCUT_NAMES:
                # a shortcut runs beside the block from the block's input: rewrite it with the entry state,
                # and let the main path alone carry the state on
                saved = (self.stride, self.factor, self.removed)
                self.stride, self.factor = entry
                self._rewrite(module, name, child)
                self.stride, self.factor, self.removed = saved
            else:
                self._rewrite(module, name, child)

    def _rewrite(self, parent: nn.Module, name: str, m: nn.Module) -> None:
        if isinstance(m, nn.ConvTranspose2d):
            if self.factor > 1:
                raise FcnsegError(f"rarefy: cannot dilate the transposed convolution {name!r}; "
                                  f"rarefy the part before it")
            return
        if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            self.visit(m)
            return
        s = _square(m.stride if m.stride is not None else m.kernel_size, "stride", m)
        k = _square(m.kernel_size, "kernel", m)
        remove = s > 1 and self.stride >= self.target
        factor = self.factor  # this layer's own taps are spread by the strides removed before it
        if isinstance(m, nn.Conv2d):
            if factor > 1:
                m.dilation = tuple(d * factor for d in _pair(m.dilation))
                if not isinstance(m.padding, str):
                    m.padding = tuple(p * factor for p in _pair(m.padding))
                elif m.padding == "same" and remove:
                    raise FcnsegError(f"rarefy: {name!r} uses padding='same' with a stride")
            if remove:
                m.stride = (1, 1)
        elif isinstance(m, nn.MaxPool2d):
            if remove or factor > 1:
                setattr(parent, name, _RarefiedMaxPool(m, factor))
        else:  # AvgPool2d has no dilation
            if remove or (factor > 1 and k > 1):
                raise FcnsegError(f"rarefy: cannot dilate the average pooling {name!r}; use shift-and-stitch")
        if remove:
            self.factor *= s
            self.removed += 1
        self.stride *= s


def rarefy(model: nn.Module, target_stride: int) -> nn.Module:
    """A copy of ``model`` whose output stride is ``target_stride``: strides past it set to 1, later filters dilated.

    ``model``'s main path is walked in registration order (as ``geometry.walk`` does); Conv2d,
    MaxPool2d and (undilated) AvgPool2d are understood, shortcut branches (``downsample``,
    ``shortcut``, ``skip``) follow their block. ``model`` itself is not changed. ``target_stride``
    must be a cumulative stride the net reaches (e.g. 8 or 16 in a stride-32 trunk).
    """
    _, total = receptive_field(model)
    reachable, acc = {1}, 1
    for m in spatial_layers(model):
        if not isinstance(m, nn.ConvTranspose2d):
            acc *= _square(m.stride if m.stride is not None else m.kernel_size, "stride", m)
            reachable.add(acc)
    if target_stride not in reachable:
        raise FcnsegError(f"rarefy: stride {target_stride} is not reached inside the net; "
                          f"choose one of {', '.join(map(str, sorted(reachable)))}")
    dense = copy.deepcopy(model)
    _Rarefier(target_stride).visit(dense)
    log.debug("rarefied a stride-%d net to stride %d", total, target_stride)
    return dense


def interior(length: int, rf: int, offset: float, target_stride: int, factor: int) -> slice:
    """Dense cells (along one axis of ``length`` input pixels) whose ``rf``-pixel window, centred on
    ``target_stride*q + offset``, lies inside ``[(factor-1)*target_stride, length)``: there
    shift-and-stitch and rarefaction agree exactly."""
    lo = (factor - 1) * target_stride
    first = math.ceil((lo + (rf - 1) / 2 - offset) / target_stride)
    last = math.floor((length - 1 - (rf - 1) / 2 - offset) / target_stride)
    return slice(max(first, 0), max(last + 1, max(first, 0)))


class _CoarseScorer(nn.Module):
    """An FCN-32s's backbone, fc6/fc7 and score layer: the part that rarefaction rewrites."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone, self.fc, self.score_fr = model.backbone, model.fc, model.score_fr
        self.top_stride = model.top_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_fr(self.fc(self.backbone(x)[self.top_stride]))  # (B, K, ~H/t, ~W/t) when rarefied


class DenseFCN(nn.Module):
    """An FCN whose scores are made dense at ``stride`` by shift-and-stitch or rarefaction, then
    brought to input size by fixed bilinear upsampling (by ``stride``) and a computed crop.

    ``model`` needs ``scores(x)`` and ``score_geometry`` (``FCN`` has both). Rarefaction needs a net
    without skips (FCN-32s): a skip fuses maps at fixed strides. Forward gives (B, K, H, W) logits.
    """

    def __init__(self, model: nn.Module, method: DenseMethod, stride: int):
        super().__init__()
        if method not in DENSE_METHODS:
            raise FcnsegError(f"unknown dense method {method!r}; valid: {', '.join(DENSE_METHODS)}")
        if not hasattr(model, "scores") or not hasattr(model, "score_geometry"):
            raise FcnsegError(f"{type(model).__name__} is not an FCN; dense outputs need its class scores "
                              f"before upsampling")
        coarse = int(model.output_stride)
        if stride < 1 or coarse % stride:
            raise FcnsegError(f"dense stride {stride} must divide the model's output stride {coarse} "
                              f"(e.g. {', '.join(str(s) for s in (1, 2, 4, 8, 16) if coarse % s == 0 and s < coarse)})")
        if method == "rarefaction" and model.skips:
            raise FcnsegError(f"rarefaction needs a net without skips (FCN-32s); this one fuses strides "
                              f"{', '.join(map(str, model.skips))}: use shift-and-stitch")
        # the rarefied copy replaces the model (keeping both would hold, and count, the weights twice)
        self.model = model if method == "shift-and-stitch" else None
        self.method, self.stride, self.coarse_stride = method, int(stride), coarse
        self.passes = (coarse // stride) ** 2 if method == "shift-and-stitch" else 1
        self.num_classes = model.num_classes
        self.top_stride = model.top_stride
        self.rarefied = rarefy(_CoarseScorer(model), stride) if method == "rarefaction" else None
        # dense cell q sits on pixel stride*q + c; cells replicated past the top/left edge until the
        # upsampled map starts at or before pixel 0 (a net whose scores start inside the image)
        self.upsample = (Upsample(model.num_classes, stride, "bilinear", learnable=False) if stride > 1
                         else nn.Identity())
        self.lead = 0
        while (offset := crop_offset(self._up_geometry(Geometry(float(stride), model.score_geometry.offset
                                                                - self.lead * stride)), Geometry())) < 0:
            self.lead += 1
        self.offset = offset

    def _up_geometry(self, geo: Geometry) -> Geometry:
        return self.upsample.geometry(geo) if isinstance(self.upsample, Upsample) else geo

    def _up_length(self, cells: int) -> int:
        return cells * self.stride + self.stride if isinstance(self.upsample, Upsample) else cells

    def dense_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, ~H/stride, ~W/stride) scores, cell q on input pixel ``stride*q + score_geometry.offset``."""
        if self.rarefied is not None:
            return self.rarefied(x)
        return shift_and_stitch(self.model.scores, x, self.coarse_stride, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        scores = self.dense_scores(x)  # (B, K, ~H/stride, ~W/stride)
        trail = []  # edge cells replicated at the bottom/right so that the upsampled map covers the image
        for n, size in ((scores.shape[-1], w), (scores.shape[-2], h)):
            extra = 0
            while self._up_length(n + self.lead + extra) < self.offset + size:
                extra += 1
            trail.append(extra)
        if self.lead or any(trail):
            scores = F.pad(scores, (self.lead, trail[0], self.lead, trail[1]), mode="replicate")
        out = self.upsample(scores)  # (B, K, >=H, >=W)
        return out[:, :, self.offset:self.offset + h, self.offset:self.offset + w]  # (B, K, H, W)


def densify(model: nn.Module, method: DenseMethod, stride: int) -> DenseFCN:
    """``DenseFCN`` over a loaded checkpoint, keeping its record (with the method noted) and arch."""
    dense = DenseFCN(model, method, stride)
    record = getattr(model, "record", None)
    note = {"method": method, "stride": int(stride), "passes": dense.passes}
    # a CheckpointRecord stays one (its normalisation, classes and colours are what inference reads)
    if isinstance(record, CheckpointRecord):
        dense.record = record.replace(dense=note)
    else:
        dense.record = {**(record or {}), "dense": note}
    dense.arch = getattr(model, "arch", None)
    return dense
