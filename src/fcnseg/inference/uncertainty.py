"""Per-pixel uncertainty from class probabilities (normalised entropy, 1 - margin) and ranking images by it."""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import FcnsegError

log = logging.getLogger(__name__)

MEASURES = ("entropy", "margin")


def normalized_entropy(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """-sum p log p / log K over ``dim``: 0 for a one-hot pixel, 1 for a uniform one."""
    k = probs.shape[dim]
    if k < 2:
        return torch.zeros_like(probs.select(dim, 0), dtype=torch.float32)
    p = probs.float().clamp_min(0)
    # 0 log 0 is 0: xlogy gives exactly that without a NaN from log(0)
    return (-torch.special.xlogy(p, p).sum(dim) / math.log(k)).clamp_(0, 1)


def one_minus_margin(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """1 - (best - second best probability): 0 when one class has it all, 1 for a tie."""
    if probs.shape[dim] < 2:
        return torch.zeros_like(probs.select(dim, 0), dtype=torch.float32)
    top = probs.float().topk(2, dim=dim).values
    return (1 - (top.select(dim, 0) - top.select(dim, 1))).clamp_(0, 1)


def uncertainty(probs: torch.Tensor, measure: str = "entropy", dim: int = 0) -> torch.Tensor:
    """Per-pixel uncertainty in [0, 1] from probabilities (K, H, W) (or over ``dim``)."""
    if measure == "entropy":
        return normalized_entropy(probs, dim)
    if measure == "margin":
        return one_minus_margin(probs, dim)
    raise FcnsegError(f"unknown uncertainty measure {measure!r}; valid: {', '.join(MEASURES)}")


def to_png_array(u: torch.Tensor | np.ndarray) -> np.ndarray:
    """An (H, W) uncertainty in [0, 1] as uint8 0..255 (255 = most uncertain) for an 8-bit PNG."""
    arr = u.float().numpy() if isinstance(u, torch.Tensor) else np.asarray(u, dtype=np.float32)
    return np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)


def rank_images(segmenter, files: Sequence[str | Path], out: str | Path, measure: str = "entropy",
                progress: bool = False, on_problem: Callable[[str], None] | None = None) -> tuple[list[dict], int]:
    """Mean uncertainty of ``segmenter``'s prediction for each image, most uncertain first, written as CSV
    (rank, image, mean_uncertainty, uncertain_share = share of pixels above 0.5). Unreadable images are
    reported through ``on_problem`` and left out; returns (rows, number failed)."""
    from tqdm import tqdm

    from ..files import atomic_write
    from ..data.io import read_image

    uncertainty(torch.ones(2, 1, 1) / 2, measure)  # an unknown measure fails before any image is read
    rows, failed = [], 0
    for path in tqdm(list(files), unit="image", disable=not progress or len(files) < 2):
        try:
            pred = segmenter.segment(read_image(path), probs=True)
        except (FcnsegError, OSError, ValueError) as e:
            failed += 1
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if on_problem:
                on_problem(msg if str(path) in msg else f"{path}: {msg}")
            else:
                log.warning("%s: %s", path, msg)
            continue
        u = uncertainty(pred.probs, measure)
        rows.append({"image": str(path), "mean_uncertainty": float(u.mean()),
                     "uncertain_share": float((u > 0.5).float().mean())})
    rows.sort(key=lambda r: -r["mean_uncertainty"])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["rank", "image", "mean_uncertainty", "uncertain_share"],
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "mean_uncertainty": f"{r['mean_uncertainty']:.6f}",
                         "uncertain_share": f"{r['uncertain_share']:.6f}"})
    atomic_write(out, lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return rows, failed
