"""Segmenter's options, grouped by what they change: ``Tiling`` (memory on large images), ``TTA`` (test-time
augmentation) and ``Resize`` (the scale photos are segmented at). Each is a frozen value checked once when made,
so a bad number is a one-line error before any weights are loaded.

    seg = Segmenter(weights, tiling=Tiling(tile=512, overlap=128), tta=TTA(flip=True), resize=Resize(max_side=0))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import FcnsegError
from .tta import check_scales


def _whole(name: str, value: Any) -> int:
    """``int(value)`` as Segmenter has always taken it (2.0 -> 2), or a one-line error for what int() refuses."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise FcnsegError(f"{name} must be a whole number, got {value!r}") from None


@dataclass(frozen=True)
class Tiling:
    """Images larger than ``tile`` pixels on a side are cut into tiles sharing ``overlap`` pixels; same-sized
    images that need no tiling run ``batch_size`` at a time (below 1 counts as 1). Whether a tile leaves room
    inside its overlap depends on the network's stride, so that is checked when an image is tiled
    (``fcnseg.inference.tiling.tile_spans``)."""

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
