"""The one evaluation loop: ``evaluate(model, batches)`` -> a ``ConfusionMatrix`` (or one per head for a multi-head
net), used by validation during training, ``fcnseg evaluate``, the precision gate and the scoring workers.

Evaluation at inference speed: ``evaluate_model`` scores a model on a dataset the way ``predict``
runs it (an optimized copy, equal-size images batched, loading overlapped) and returns a
``ConfusionMatrix`` identical to scoring the images one by one (float32).

On a small CPU the images are scored in the loader's worker processes (``ScoringWorkers``): each loads one
image at a time, runs the model on one thread and counts, and only the counts travel back. With the model's
intra-op threads and the loader's processes on the same few cores, the loaders preempt the model's threads in
the middle of their parallel regions; on a 2-core Xeon the in-process path scored CamVid val at 18 to 23
images/s against 40 for the model alone, the scoring workers at 30 (``benchmarks/evaluate_speed.py``).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import FcnsegError
from ..inference.optimize import optimize
from ..inference.options import TestTimeAugmentation, check_scales, class_ids
from ..models.multihead import head_targets
from ..modes import eval_mode
from .metrics import ConfusionMatrix


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


class ScoringWorkers(Dataset):
    """``indices`` of ``dataset`` as already scored items: ``self[i]`` loads image ``indices[i]``, runs ``net`` on
    it and returns its flattened confusion counts (``num_classes ** 2``). Read through a ``DataLoader`` with
    workers, the loading, the network and the counting all run in the worker processes, one thread each (no
    OpenMP team is started in a forked process), and only the small count vectors cross back. One image an item:
    batching in a one-thread worker was slower per image (CamVid, 20 against 28 images/s for the whole path),
    and small items spread evenly over the workers."""

    def __init__(self, dataset, indices: Sequence[int], net: nn.Module, num_classes: int, ignore_index: int) -> None:
        self.dataset, self.indices, self.net = dataset, list(indices), net
        self.num_classes, self.ignore_index = int(num_classes), ignore_index

    def __len__(self) -> int:
        return len(self.indices)

    @staticmethod
    def worker_init(worker_id: int) -> None:
        torch.set_num_threads(1)

    def __getitem__(self, i: int) -> torch.Tensor:
        image, mask = self.dataset[self.indices[i]][:2]
        cm = ConfusionMatrix(self.num_classes, ignore_index=self.ignore_index)
        with torch.inference_mode():
            cm.update(target=mask[None], pred=class_ids(self.net(image[None])))
        return cm.mat.reshape(-1)


def evaluate_model(model: nn.Module, dataset, *, indices: Sequence[int] | None = None,
                   num_classes: int | None = None, ignore_index: int | None = None,
                   device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                   channels_last: bool = True, optimize_model: bool = True, inplace: bool = False,
                   batch_size: int = 8, workers: int = 2, flip: bool = False, scales: Sequence[float] = (1.0,),
                   progress: bool = False, desc: str = "evaluate") -> ConfusionMatrix:
    """The confusion matrix of ``model`` over ``dataset`` (items ``(image, mask)`` at their own size, the
    images normalised as the model expects), or over ``indices`` of it.

    With ``optimize_model`` the model runs as ``fcnseg.inference.optimize.optimize`` converts it (``dtype``,
    ``channels_last``, batch norm folded): on a copy, or on ``model`` itself with ``inplace``. Images of
    equal size run ``batch_size`` at a time. Where the ``workers`` are at least as many as this process's CPU
    threads (a small machine), each worker process loads and scores its own images, one at a time on one
    thread (``ScoringWorkers``); otherwise (more cores, a GPU, an ONNX Runtime or OpenVINO model) the workers load the
    next batches while this process runs the model. ``flip``/``scales`` add test-time augmentation
    (``TestTimeAugmentation``). A model that is not a PyTorch network (an ONNX Runtime module) runs with
    ``optimize_model=False``.
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
    indices = list(range(len(dataset)) if indices is None else indices)
    if workers and workers >= torch.get_num_threads() and device.type == "cpu" and _forkable(model):
        return _score_in_workers(net, dataset, indices, num_classes, ignore_index, int(workers), progress, desc)
    subset = Subset(dataset, indices)
    # a private generator: starting the workers must not draw from the caller's global RNG
    loader = DataLoader(subset, batch_size=int(batch_size), shuffle=False, num_workers=int(workers),
                        collate_fn=collate_by_size, pin_memory=device.type == "cuda", generator=torch.Generator())
    return evaluate(net, _batches(loader), num_classes, device=device, ignore_index=ignore_index,
                    progress=progress, desc=desc)


def _forkable(model: nn.Module) -> bool:
    """Whether worker processes may run ``model``: a PyTorch network (an ONNX Runtime or OpenVINO module keeps
    native thread pools that a forked process must not inherit)."""
    from ..weights.runtimes import OnnxRuntimeModule

    return not isinstance(model, OnnxRuntimeModule)


def _score_in_workers(net: nn.Module, dataset, indices: list[int], num_classes: int, ignore_index: int,
                      workers: int, progress: bool, desc: str) -> ConfusionMatrix:
    """``ScoringWorkers`` through ``workers`` loader processes; the counts summed here."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    scored = ScoringWorkers(dataset, indices, net, num_classes, ignore_index)
    loader = DataLoader(scored, batch_size=None, shuffle=False, num_workers=min(workers, max(1, len(scored))),
                        worker_init_fn=scored.worker_init, generator=torch.Generator())
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    for counts in tqdm(loader, total=len(scored), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
                       leave=False):
        cm.mat += counts.reshape(num_classes, num_classes)
    cm.all_reduce()
    return cm


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple], num_classes: int | None = None, *,
             device: str | torch.device = "cpu", ignore_index: int = 255, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, progress: bool = True,
             desc: str = "evaluate") -> ConfusionMatrix | dict[str, ConfusionMatrix]:
    """Score ``model`` over ``batches`` (``(images, masks, ...)``, at the images' own resolution) and return the
    confusion matrix, summed over processes when distributed.

    A multi-head net (its forward returns ``{head: logits}``; ``model.head_classes`` names the heads) gives one
    matrix per head, ``{head: ConfusionMatrix}``; its masks are ``{head: mask}`` or a (B, n_heads, H, W) stack in
    the model's head order. ``num_classes`` defaults to ``model.num_classes``."""
    from tqdm import tqdm

    device = torch.device(device)
    heads = getattr(model, "head_classes", None)
    classes = dict(heads) if heads else {None: int(num_classes or model.num_classes)}
    cms = {name: ConfusionMatrix(k, ignore_index=ignore_index, device=device) for name, k in classes.items()}
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False):
            images, masks = batch[0].to(device), batch[1]
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                logits = model(images)  # (B, K, H, W), or {head: (B, K_head, H, W)}
            if not isinstance(logits, Mapping):
                logits, masks = {None: logits}, {None: masks}
            elif not isinstance(masks, Mapping):
                masks = head_targets(masks, list(logits))
            for name, head_logits in logits.items():
                cms[name].update(target=masks[name].to(device), pred=class_ids(head_logits))
    for cm in cms.values():
        cm.all_reduce()
    return cms if heads else cms[None]
