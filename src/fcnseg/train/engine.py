"""One epoch of training and one pass of evaluation, as plain functions.

``train_one_epoch`` runs the optimiser over a loader of ``(images, masks, indices)`` batches; scoring is
``fcnseg.evaluation.loop.evaluate``, the one evaluation loop. How each step is taken is one ``StepOptions`` value and
where the epoch starts one ``EpochStart``; run-level work (configs, checkpoints, resume, plots) lives in
``fcnseg.train.run``.

Loss normalisation, so that the paper's and modern recipes both work and a distributed run
matches a single process with the same global batch:

- ``reduction="mean"``: the cross-entropy averaged over the labelled (and sampled) pixels of the
  global batch (all processes), weighted by class weights as ``F.cross_entropy`` does;
- ``reduction="sum"``: summed over pixels and averaged over the images of the global batch: the
  paper's unnormalised loss (batch 1, lr 1e-10 for FCN-32s), independent of the batch size.

With gradient accumulation each optimiser step averages its micro-batches (Caffe's ``iter_size``).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FcnsegError
from ..evaluation.loop import autocast
from ..inference.options import class_ids
from ..models.multihead import head_targets, multihead_loss
from .batchnorm import exact_batch_norm


class NonFiniteLossError(FcnsegError):
    """The loss became NaN or infinite; the message names the step and the batch's files."""


class SegmentationLoss(nn.Module):
    """Pixel-wise cross-entropy with an ignore index, optional class weights and loss sampling.

    ``forward`` returns ``(loss_sum, normaliser)``: the weighted sum over kept pixels and, for
    ``reduction="mean"``, the summed weight of those pixels (their count without class weights), for
    ``reduction="sum"``, the number of images. The caller divides, after summing the normaliser
    over processes.
    """

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean", sample: float = 1.0,
                 ignore_index: int = 255):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.reduction = reduction
        self.sample = float(sample)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sample < 1.0:
            # the paper's patch sampling: drop each output cell from the loss with probability 1 - p
            drop = torch.rand(target.shape, device=target.device) >= self.sample
            target = target.masked_fill(drop, self.ignore_index)
        loss_sum = F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index,
                                   reduction="sum")
        if self.reduction == "sum":
            return loss_sum, torch.tensor(float(target.shape[0]), device=logits.device)
        valid = target != self.ignore_index
        if self.weight is not None:
            norm = self.weight[target[valid]].sum()
        else:
            norm = valid.sum().to(torch.float32)
        return loss_sum, norm.detach().float()


class HeadsLoss(nn.Module):
    """The loss of a multi-head net (``models.multihead``): ``forward(outputs {head: logits}, masks (B, n_heads,
    H, W))``, mask channel i belonging to ``heads[i]``. Each head's ``SegmentationLoss`` is normalised on its own
    (its labelled pixels, or images for ``reduction="sum"``) and the heads' losses are summed
    (``multihead_loss``); the normaliser returned is 1, so a distributed run averages the processes' sums."""

    def __init__(self, loss: SegmentationLoss, heads: Sequence[str]) -> None:
        super().__init__()
        self.loss, self.heads = loss, list(heads)
        self.ignore_index = loss.ignore_index

    def forward(self, outputs: dict[str, torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def per_head(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss_sum, norm = self.loss(logits, target)
            return loss_sum / norm.clamp_min(1e-12)

        total, _ = multihead_loss(outputs, head_targets(masks, self.heads), per_head)
        return total, torch.ones((), device=masks.device)


def _first_head(logits, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and masks the training pixel accuracy counts: a multi-head net's first head."""
    if isinstance(logits, dict):
        return next(iter(logits.values())), masks[:, 0]
    return logits, masks


@dataclass(frozen=True)
class StepOptions:
    """How every optimiser step of a run is taken (the same for each epoch)."""

    accumulate: int = 1  # micro-batches per optimiser step
    amp_dtype: torch.dtype | None = None  # autocast dtype, None: full precision
    grad_clip: float = 0.0  # clip the gradient norm to this (0: off)
    on_nonfinite: str = "stop"  # stop: raise NonFiniteLossError; skip: skip the step and count it
    channels_last: bool = False
    exact_batch_norm: bool = False  # fcnseg.train.batchnorm's exact channels-last batch norm in the forward pass
    progress: bool = True  # a tqdm bar


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch (or the rest of one, when resuming) begins."""

    epoch: int = 0
    global_step: int = 0  # optimiser steps taken before this call
    batch: int = 0  # micro-batches of the epoch already done (the loader must skip them)
    batches: int | None = None  # micro-batches in the whole epoch; None: ``batch + len(loader)``


@dataclass
class EpochStats:
    """What one (possibly partial) epoch did."""

    loss_sum: float = 0.0  # sum of the per-step losses
    steps: int = 0  # optimiser steps taken in this call
    skipped: int = 0  # steps skipped for a non-finite loss
    batches: int = 0  # micro-batches consumed in this call
    images: int = 0
    correct: int = 0  # training pixel accuracy counts (labelled pixels only)
    labelled: int = 0
    seconds: float = 0.0
    stopped: bool = False  # ``after_step`` asked to stop (time budget, max steps)
    losses: list[float] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else math.nan

    @property
    def pixel_accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else math.nan


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _scaling(scaler: torch.amp.GradScaler | None) -> bool:
    return scaler is not None and scaler.is_enabled()


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    grad_clip: float) -> None:
    """One optimiser step on the accumulated gradients (unscaled first, so clipping sees their true norm),
    then clear them."""
    if _scaling(scaler):
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if _scaling(scaler):
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _window(batch: int, accumulate: int, total: int) -> tuple[int, bool]:
    """The number of micro-batches in the optimiser step that micro-batch ``batch`` belongs to (the last window of
    an epoch may be short), and whether ``batch`` is its last."""
    start = (batch // accumulate) * accumulate
    window = min(accumulate, total - start)
    return window, batch == start + window - 1


def _shared_normaliser(loss_sum: torch.Tensor, norm: torch.Tensor, world: int) -> tuple[torch.Tensor, bool, bool]:
    """The loss normaliser summed over processes, whether this process's loss is non-finite, and whether any
    process's is (one all-reduce for both)."""
    bad = not bool(torch.isfinite(loss_sum))
    shared = torch.stack([norm.float(), torch.tensor(float(bad), device=norm.device)])
    if world > 1:
        dist.all_reduce(shared)
    return shared[0], bad, bool(shared[1] > 0)


@torch.no_grad()
def _pixel_counts(logits, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(correct, labelled) pixels of the first head, as a device tensor."""
    logits, masks = _first_head(logits, masks)
    valid = masks != ignore_index
    return torch.stack([((class_ids(logits) == masks) & valid).sum(), valid.sum()])


def _nonfinite_error(loss: float, here: bool, global_step: int, epoch: int, batch: int, indices,
                     names: Sequence[str] | None) -> NonFiniteLossError:
    """The error for a non-finite loss: where it happened and the files of this process's batch."""
    files = [names[int(i)] for i in indices] if names is not None else [str(int(i)) for i in indices]
    where = "this process's batch" if here else "another process's batch"
    return NonFiniteLossError(
        f"non-finite loss ({loss}) at step {global_step + 1} (epoch {epoch + 1}, batch {batch + 1}) in {where}: "
        f"{', '.join(files)}. Lower the learning rate, check these files, or pass --on-nonfinite skip to skip "
        f"such steps")


def _to_device(images: torch.Tensor, masks: torch.Tensor, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks


def _close_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler | None,
                grad_clip: float, stats: "EpochStats", tainted: bool, step_loss: float) -> None:
    """The end of one optimiser step: take it (a tainted one is skipped and counted), then advance the schedule."""
    if tainted:
        stats.skipped += 1
        optimizer.zero_grad(set_to_none=True)
    else:
        _optimizer_step(model, optimizer, scaler, grad_clip)
        stats.loss_sum += step_loss
        stats.losses.append(step_loss)
    if scheduler is not None:
        scheduler.step()  # the schedule counts steps, skipped or not, so it stays on time
    stats.steps += 1


def _show_progress(bar, stats: "EpochStats", optimizer: torch.optim.Optimizer, elapsed: float) -> None:
    bar.set_postfix(loss=f"{stats.losses[-1]:.4g}" if stats.losses else "-",
                    lr=f"{optimizer.param_groups[0]['lr']:.3g}", img_s=f"{stats.images / max(elapsed, 1e-9):.1f}")


def train_one_epoch(model: nn.Module, loader, loss_fn: SegmentationLoss, optimizer: torch.optim.Optimizer,
                    scheduler=None, scaler: torch.amp.GradScaler | None = None, *, device: torch.device,
                    options: StepOptions = StepOptions(), start: EpochStart = EpochStart(),
                    names: Sequence[str] | None = None,
                    after_step: Callable[[int, int, EpochStats], bool] | None = None) -> EpochStats:
    """Train over ``loader`` (batches ``(images, masks, indices)``) from ``start``.
    ``after_step(global_step, batch_in_epoch, stats)`` runs after each optimiser step; returning True ends the
    epoch early. ``names[i]`` names dataset item ``i`` for error messages.
    """
    from tqdm import tqdm

    model.train()
    stats = EpochStats()
    world = dist.get_world_size() if _distributed() else 1
    epoch, global_step, accumulate = start.epoch, start.global_step, options.accumulate
    total = start.batches if start.batches is not None else start.batch + len(loader)
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start.batch, desc=f"epoch {epoch + 1}", unit="batch",
               disable=not options.progress, dynamic_ncols=True, leave=False)
    tainted, step_loss = False, 0.0
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, labelled (training pixel accuracy)
    optimizer.zero_grad(set_to_none=True)
    b = start.batch
    for images, masks, indices in loader:
        images, masks = _to_device(images, masks, device, options.channels_last)
        window, last_in_window = _window(b, accumulate, total)
        sync = contextlib.nullcontext() if last_in_window or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, options.amp_dtype), exact_batch_norm(options.exact_batch_norm):
                logits = model(images)  # (B, K, H, W)
            loss_sum, norm = loss_fn(logits, masks)
            norm, bad, bad_anywhere = _shared_normaliser(loss_sum, norm, world)
            if bad_anywhere:
                if options.on_nonfinite == "stop":
                    raise _nonfinite_error(float(loss_sum.detach()), bad, global_step, epoch, b, indices, names)
                tainted = True
            else:
                loss = loss_sum * world / norm.clamp_min(1e-12) / window
                (scaler.scale(loss) if _scaling(scaler) else loss).backward()
                step_loss += float(loss.detach())  # summed over the window: this process's share x world
        counts += _pixel_counts(logits, masks, loss_fn.ignore_index)  # on the device: no host sync per step
        stats.batches += 1
        stats.images += images.shape[0]
        b += 1
        bar.update(1)
        if not last_in_window:
            continue

        _close_step(model, optimizer, scheduler, scaler, options.grad_clip, stats, tainted, step_loss)
        global_step += 1
        tainted, step_loss = False, 0.0
        _show_progress(bar, stats, optimizer, time.perf_counter() - t0)
        if after_step is not None and after_step(global_step, b, stats):
            stats.stopped = True
            break
    bar.close()
    stats.correct, stats.labelled = (int(c) for c in counts)
    stats.seconds = time.perf_counter() - t0
    return stats


