"""Tiling: cut an image axis into overlapping tiles aligned on the network's total stride.

Each output pixel is taken from the tile where it lies farthest from a tile edge. For a fully
convolutional net this equals untiled prediction wherever a tile's margin covers the receptive
field; memory is bounded by the tile size, not the image size.
"""
from __future__ import annotations

import math

from ..errors import FcnsegError


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
