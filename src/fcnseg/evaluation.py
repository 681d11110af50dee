"""Evaluation at inference speed: ``evaluate_model`` scores a model on a dataset the way ``predict``
runs it (an optimized copy, equal-size images batched, loading overlapped) and returns a
``ConfusionMatrix`` identical to scoring the images one by one (float32)."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .train.engine import evaluate
from .errors import FcnsegError
from .metrics import ConfusionMatrix
from .optimize import optimize
from .tta import TestTimeAugmentation, check_scales


def collate_by_size(samples: Sequence[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(image, mask, ...)`` samples as a list of ``(images, masks)`` batches, one per image size, so that
    a dataset of equal-size images gives full batches and a mixed one still works."""
    groups: dict[tuple[int, ...], list[tuple]] = {}
    for s in samples:
        groups.setdefault(tuple(s[0].shape), []).append(s)
    return [(torch.stack([s[0] for s in g]), torch.stack([s[1] for s in g])) for g in groups.values()]


def _batches(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for groups in loader:
        yield from groups


def evaluate_model(model: nn.Module, dataset, *, indices: Sequence[int] | None = None,
                   num_classes: int | None = None, ignore_index: int | None = None,
                   device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                   channels_last: bool = True, optimize_model: bool = True, inplace: bool = False,
                   batch_size: int = 8, workers: int = 2, flip: bool = False, scales: Sequence[float] = (1.0,),
                   progress: bool = False, desc: str = "evaluate") -> ConfusionMatrix:
    """The confusion matrix of ``model`` over ``dataset`` (items ``(image, mask)`` at their own size, the
    images normalised as the model expects), or over ``indices`` of it.

    With ``optimize_model`` the model runs as ``fcnseg.optimize.optimize`` converts it (``dtype``,
    ``channels_last``, batch norm folded): on a copy, or on ``model`` itself with ``inplace``. Images of
    equal size run ``batch_size`` at a time; ``workers`` loader processes prepare the next batches
    meanwhile. ``flip``/``scales`` add test-time augmentation (``TestTimeAugmentation``). A model that is
    not a PyTorch network (an ONNX Runtime module) runs with ``optimize_model=False``.
    """
    from torch.utils.data import DataLoader, Subset

    if int(batch_size) < 1 or int(workers) < 0:
        raise FcnsegError(f"batch size must be at least 1 and workers at least 0, got {batch_size} and {workers}")
    device = torch.device(device)
    num_classes = int(num_classes or model.num_classes)
    ignore_index = getattr(dataset, "ignore_index", 255) if ignore_index is None else ignore_index
    scales = check_scales(scales)
    net = optimize(model, dtype, channels_last, inplace=inplace).to(device) if optimize_model else model
    if flip or scales != (1.0,):
        net = TestTimeAugmentation(net, scales, flip)
    subset = Subset(dataset, list(range(len(dataset)) if indices is None else indices))
    # a private generator: starting the workers must not draw from the caller's global RNG
    loader = DataLoader(subset, batch_size=int(batch_size), shuffle=False, num_workers=int(workers),
                        collate_fn=collate_by_size, pin_memory=device.type == "cuda", generator=torch.Generator())
    return evaluate(net, _batches(loader), num_classes, device=device, ignore_index=ignore_index,
                    progress=progress, desc=desc)
