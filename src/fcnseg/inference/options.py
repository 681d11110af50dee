"""How one image is run: the Segmenter's option values, grouped by what they change, and the code each drives.

``Tiling`` (memory on large images: ``tile_spans``), ``TTA`` (test-time augmentation: ``tta_probabilities``,
``TestTimeAugmentation``) and ``Resize`` (the scale photos are segmented at). Each option is a frozen value checked
once when made, so a bad number is a one-line error before any weights are loaded. ``class_ids`` turns scores into
class ids the same way for predict, evaluation and training.

    seg = Segmenter(weights, tiling=Tiling(tile=512, overlap=128), tta=TTA(flip=True), resize=Resize(max_side=0))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FcnsegError

# ---------------------------------------------------------------------------------------------------
# the option values

def _whole(name: str, value: Any) -> int:
    """``int(value)`` as Segmenter has always taken it (2.0 -> 2), or a one-line error for what int() refuses."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise FcnsegError(f"{name} must be a whole number, got {value!r}") from None


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Test-time scales as a tuple of positive floats, or a one-line error."""
    out = tuple(float(s) for s in scales)
    if not out or any(s <= 0 for s in out):
        raise FcnsegError(f"scales must be positive numbers, got {list(scales)}")
    return out


@dataclass(frozen=True)
class Tiling:
    """Images larger than ``tile`` pixels on a side are cut into tiles sharing ``overlap`` pixels; same-sized
    images that need no tiling run ``batch_size`` at a time (below 1 counts as 1). Whether a tile leaves room
    inside its overlap depends on the network's stride, so that is checked when an image is tiled
    (``tile_spans``)."""

    tile: int = 1024
    overlap: int = 256
    batch_size: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "tile", _whole("tile", self.tile))
        object.__setattr__(self, "overlap", _whole("overlap", self.overlap))
        object.__setattr__(self, "batch_size", max(1, _whole("batch_size", self.batch_size)))


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: class probabilities averaged over horizontal ``flip``s and the input rescaled by
    each of ``scales`` (positive numbers; ``(1.0,)`` alone and no flip is a single plain pass)."""

    flip: bool = False
    scales: Sequence[float] = (1.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "scales", check_scales(self.scales))


@dataclass(frozen=True)
class Resize:
    """The scale photos are segmented at; masks always come back at the photo's size. ``max_side``: photos whose
    long side is larger are shrunk to it ("auto": the model's working scale, from its record or its built-in
    family's training images; a number of pixels; 0 or None: never shrink). ``scale``: a fixed factor in
    (0, 16] for every photo instead."""

    max_side: int | str | None = "auto"
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and 0 < self.scale <= 16):
            raise FcnsegError(f"scale must be a number in (0, 16], got {self.scale!r}")
        side = self.max_side
        if side == "auto" or side is None:
            return
        try:
            bad = isinstance(side, str) or int(side) < 0
        except (TypeError, ValueError, OverflowError):
            bad = True
        if bad:
            raise FcnsegError(f"max_side must be 'auto', a pixel count or 0 (never shrink), got {side!r}")
        object.__setattr__(self, "max_side", int(side) or None)


class _Unset:
    """The default of Segmenter's flat option keywords: tells "not given" apart from None (``max_side=None`` means
    never shrink)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


def grouped_options(tiling: Tiling | None, tta: TTA | None, resize: Resize | None,
                    **flat: Any) -> tuple[Tiling, TTA, Resize]:
    """The three option objects, each the one given or built from the flat keywords of its group (``tile=``,
    ``flip=``, ``max_side=``...: Segmenter's older spelling, kept working); both for one group is an error."""
    given = {k: v for k, v in flat.items() if v is not UNSET}
    out = []
    for name, cls, obj in (("tiling", Tiling, tiling), ("tta", TTA, tta), ("resize", Resize, resize)):
        mine = {f: given.pop(f) for f in cls.__dataclass_fields__ if f in given}
        if obj is None:
            out.append(cls(**mine))
        elif not isinstance(obj, cls):
            raise FcnsegError(f"{name} must be a fcnseg.{cls.__name__}, got a {type(obj).__name__}")
        elif mine:
            raise FcnsegError(f"pass {', '.join(mine)} inside {name}={cls.__name__}(...) or on their own, not both")
        else:
            out.append(obj)
    if given:
        raise TypeError(f"unexpected option keywords: {', '.join(given)}")
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------------
# tiling: each output pixel is taken from the tile where it lies farthest from a tile edge. For a fully
# convolutional net this equals untiled prediction wherever a tile's margin covers the receptive field;
# memory is bounded by the tile size, not the image size.

def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """Cut ``[0, length)`` into tiles: ``(core_start, core_end, tile_start, tile_end)`` along one axis.

    Cores partition the axis; each tile reaches at least ``overlap / 2`` (rounded up to ``align``)
    past its core on every inner side, so neighbouring tiles share ``overlap`` pixels or more. Tile
    starts are multiples of ``align`` (the network's total stride), so every tile sees the same
    pooling grid as the whole image.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    margin = math.ceil(overlap / 2 / align) * align
    step = (tile - 2 * margin) // align * align
    if step <= 0:
        raise FcnsegError(f"tile size {tile} leaves no room inside an overlap of {overlap} "
                          f"(margins round up to multiples of {align}); use a tile of at least {2 * margin + align}")
    spans = []
    for start in range(0, length, step):
        end = min(start + step, length)
        t0 = max(0, start - margin)
        spans.append((start, end, t0, min(length, t0 + tile)))
    return spans


# ---------------------------------------------------------------------------------------------------
# scores to class ids, and test-time augmentation (class probabilities averaged over horizontal flips and
# input rescalings), shared by Segmenter (predict), evaluation and training

def class_ids(scores: torch.Tensor) -> torch.Tensor:
    """The best class of each pixel: (B, K, H, W) scores -> (B, H, W) int64, the first best on ties.

    Computed as ``max(1).indices``, which returns the same ids as ``argmax(1)`` but runs several times
    faster on the CPU for a contiguous (NCHW) tensor, where argmax reduces over a strided dimension.
    """
    return scores.max(1).indices


def tta_probabilities(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class probabilities (B, K, H, W) for normalised images x (B, 3, H, W), averaged over the input
    rescaled by each of ``scales`` and, with ``flip``, its horizontal mirror (test-time augmentation).
    Each pass's softmax is resized back to H x W bilinearly before averaging."""
    h, w = x.shape[-2:]
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    total = None
    for scale, mirrored in passes:
        xi = x if scale == 1.0 else F.interpolate(
            x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", align_corners=False)
        p = logits_fn(xi.flip(-1) if mirrored else xi).float().softmax(1)
        if mirrored:
            p = p.flip(-1)
        if scale != 1.0:
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        total = p if total is None else total.add_(p)
    return total / len(passes)


class TestTimeAugmentation(nn.Module):
    """``model`` under test-time augmentation: forward gives the averaged class probabilities of
    ``tta_probabilities`` (their argmax is the augmented prediction), so it can stand wherever a model's
    logits are only argmax-ed, as in ``fcnseg.evaluation.loop.evaluate``."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, model: nn.Module, scales: Sequence[float] = (1.0,), flip: bool = False) -> None:
        super().__init__()
        self.model, self.scales, self.flip = model, check_scales(scales), bool(flip)
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_probabilities(self.model, x, self.scales, self.flip)
