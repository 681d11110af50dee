"""A training run from a TrainConfig: data, model, optimiser, the epoch loop, the run directory, resume.

``fit(cfg)`` starts a run in ``cfg.out``; ``fit(cfg, resume=True)`` continues the run in
``cfg.out`` from its newest good state, exactly (same weights as an uninterrupted run on CPU).
``setup_run`` builds a ``Run`` (everything one run holds); the loop in ``_fit`` is a few plain steps over
it: ``train_epoch``, ``epoch_row``, ``validate``, ``report_epoch``, ``save_resume_state``. The per-epoch
work is ``engine.train_one_epoch`` and ``engine.evaluate``. Messages go to the ``fcnseg`` logger, from
rank 0 only; the CLI shows them on stderr.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, make_record, save_checkpoint
from ..config import TrainConfig, save_config
from ..data.io import DataFileError, median_image_size
from ..errors import FcnsegError
from ..metrics import format_table
from ..outputs import output_dir
from . import distributed as dst
from . import engine, report
from .amp import choose_amp
from .loader import Seeded, ShardSampler, make_loader, scan_samples
from .optim import build_optimizer, build_scheduler
from .state import load_state, rng_state, save_state, set_rng_state

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "precision_macro", "recall_macro",
                "f1_macro", "f1_weighted", "num_pixels")


@dataclass
class Data:
    train: Any
    val: Any | None
    classes: list[str]
    colors: list[list[int]]
    num_classes: int
    ignore_index: int
    mean: tuple
    std: tuple
    train_indices: list[int] = field(default_factory=list)  # the samples trained on: all, or the good ones
    val_indices: list[int] = field(default_factory=list)
    listing_problems: list[str] = field(default_factory=list)  # missing partners etc. (with skip_bad)
    bad_samples: list[str] = field(default_factory=list)  # samples the start-up check left out (with skip_bad)
    # a multi-head run (the dataset yields one mask channel per head): {head: {classes, colors, label_source}}
    heads: dict[str, dict[str, Any]] | None = None


@dataclass
class Position:
    """Where the run is: the next epoch, the micro-batches of it already done, optimiser steps taken."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    order: list[int] | None = None  # the epoch's sample order while inside it


@dataclass
class Run:
    """Everything one training run holds; made by ``setup_run``, advanced by the loop in ``_fit``."""

    cfg: TrainConfig
    info: dst.DistInfo
    data: Data
    model: nn.Module  # the bare model: weights, checkpoints, validation
    net: nn.Module  # what trains: the model or its DistributedDataParallel wrapper
    loss_fn: engine.SegmentationLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    options: engine.StepOptions
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    names: list[str]  # names[i]: dataset item i, for error messages
    command: list[str] | None = None
    code: dict[str, Any] = field(default_factory=dict)
    pos: Position = field(default_factory=Position)
    stopped: bool = False  # max_steps or the time budget ended the run before its last epoch
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl rows
    best: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    late_bad: list[str] = field(default_factory=list)  # samples that went bad after the start-up check
    filled_slots: int = 0  # batch slots filled with the next sample because theirs was bad
    last_scores: dict[str, Any] = field(default_factory=dict)
    last_head_scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # multi-head runs: every head's
    started: float = 0.0  # perf_counter() at the run's start, moved back by the time trained before a resume
    writer: report.Scalars | None = None
    amp: dict[str, Any] = field(default_factory=dict)  # choose_amp's decision (version.json, the summary)
    budget_warned: bool = False  # the time-budget projection warns once per run

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def done(self) -> bool:
        return self.stopped or self.pos.epoch >= self.cfg.epochs

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def sample_counts(self) -> dict[str, int]:
        return {"skipped_samples": len(self.data.bad_samples) + len(self.late_bad),
                "listing_problems": len(self.data.listing_problems), "filled_slots": self.filled_slots}


def log(info: dst.DistInfo, msg: str, level: int = logging.INFO) -> None:
    """Log from rank 0 only, so a distributed run says each thing once."""
    if info.main:
        logger.log(level, msg)


# ---- set-up -------------------------------------------------------------------------------------------------
def dataset_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The build_dataset keywords of this run: ``dataset_kwargs``, and ``skip_bad`` from its own setting."""
    if "skip_bad" in cfg.dataset_kwargs:
        raise FcnsegError("dataset_kwargs: skip_bad is a setting of its own; pass --skip-bad (or 'skip_bad: true' "
                          "in the config)")
    return dict(cfg.dataset_kwargs, skip_bad=True) if cfg.skip_bad else dict(cfg.dataset_kwargs)


def build_data(cfg: TrainConfig, info: dst.DistInfo = dst.DistInfo()) -> Data:
    """The training split with the dataset's training preset (flags override its crop and scales), and the
    validation split at original resolution. With ``skip_bad``, bad samples are left out (see ``leave_out_bad``)."""
    from ..data import build_dataset, build_transforms

    kwargs = dataset_kwargs(cfg)
    train = build_dataset(cfg.dataset, cfg.root, cfg.split, **kwargs)
    kw: dict[str, Any] = {"mean": tuple(getattr(train, "mean", IMAGENET_MEAN)),
                          "std": tuple(getattr(train, "std", IMAGENET_STD))}
    aug: dict[str, Any] = {"flip": cfg.flip}
    if cfg.crop_size is not None:
        aug["crop_size"] = () if cfg.crop_size in ([], [0, 0]) else tuple(cfg.crop_size)  # (): whole images
    if cfg.scale_range:
        aug["scale_range"] = tuple(cfg.scale_range)
    if cfg.jitter is not None:
        aug["jitter"] = cfg.jitter
    train.transforms = build_transforms(getattr(train, "preset", cfg.dataset), train=True, **kw, **aug)
    # validation: the evaluation preset (original resolution)
    val = build_dataset(cfg.dataset, cfg.root, cfg.val_split, **kwargs) if cfg.val_split else None
    if len(train) == 0:
        raise FcnsegError(f"{cfg.root}: the {cfg.split!r} split of {cfg.dataset} is empty")
    data = Data(train, val, list(train.classes), [list(c) for c in train.colors], int(train.num_classes),
                int(getattr(train, "ignore_index", 255)), kw["mean"], kw["std"],
                train_indices=list(range(len(train))), val_indices=list(range(len(val) if val is not None else 0)),
                heads=getattr(train, "heads", None))
    if cfg.skip_bad:
        leave_out_bad(data, cfg, info)
    return data


def leave_out_bad(data: Data, cfg: TrainConfig, info: dst.DistInfo) -> None:
    """Check every sample once before training (rank 0, in the loader's workers) and train and validate on
    the good ones only, so no bad slot is ever filled by a neighbour. Each listing problem and each bad
    sample is logged once, as a warning, and counted (``Run.sample_counts``)."""
    found: list = [None]
    if info.main:
        found = [{}]
        for split, ds in (("train", data.train), ("val", data.val)):
            if ds is not None:
                good, bad = scan_samples(ds, cfg.workers)
                found[0][split] = (good, bad, list(getattr(ds, "problems", [])))
    if info.enabled:  # every process must train on the same index
        torch.distributed.broadcast_object_list(found, 0)
    by_split = found[0]
    data.train_indices, train_bad, train_listing = by_split["train"]
    data.val_indices, val_bad, val_listing = by_split.get("val", ([], [], []))
    # a file in both splits is one problem: named once, counted once
    data.listing_problems = list(dict.fromkeys(train_listing + val_listing))
    data.bad_samples = list(dict.fromkeys(train_bad + val_bad))
    for message in data.listing_problems:
        log(info, f"listing problem, sample left out: {message}", logging.WARNING)
    for message in data.bad_samples:
        log(info, f"skipped bad sample: {message}", logging.WARNING)
    if not data.train_indices:
        raise FcnsegError(f"{cfg.root}: every sample of the {cfg.split!r} split of {cfg.dataset} is bad "
                          f"({len(train_bad)} bad files); run 'fcnseg data check' for the list")
    if data.val is not None and not data.val_indices:
        raise FcnsegError(f"{cfg.root}: every sample of the {cfg.val_split!r} split of {cfg.dataset} is bad; "
                          f"run 'fcnseg data check', or pass --val-split none")
    log(info, f"--skip-bad: training on {len(data.train_indices)} of {len(data.train)} samples"
              + (f", validating on {len(data.val_indices)} of {len(data.val)}" if data.val is not None else "")
              + f"; {len(data.bad_samples)} bad samples and {len(data.listing_problems)} listing problems left out")


def build_net(cfg: TrainConfig, num_classes: int, info: dst.DistInfo) -> nn.Module:
    from ..models import transfer_weights
    from ..registry import build_model

    kwargs = dict(cfg.model_kwargs)
    if cfg.pretrained:
        kwargs["pretrained"] = True
    model = build_model(cfg.model, num_classes=num_classes, **kwargs)  # an unknown name: FcnsegError
    if cfg.init_from:
        src = load_checkpoint(cfg.init_from)
        copied = transfer_weights(model, src)
        total = len(model.state_dict())
        if not copied:
            raise FcnsegError(f"{cfg.init_from}: no tensor fits {cfg.model} (from {src.record['arch']}); "
                              f"staged training goes fcn32s -> fcn16s -> fcn8s of one backbone")
        log(info, f"init from {cfg.init_from} ({src.record['arch']}): copied {len(copied)} of {total} tensors")
    return model


def resolve_class_weights(spec, data: Data, cfg: TrainConfig) -> torch.Tensor | None:
    """``spec``: None, a list of K numbers, 'median' (median-frequency balancing over the training masks,
    as ``fcnseg data check`` computes it), or the JSON file that ``fcnseg data check`` writes."""
    from ..data.checks import check_dataset, load_class_weights

    k = data.num_classes
    if spec is None:
        return None
    if spec == "median":
        from ..data import build_dataset

        scan = check_dataset(build_dataset(cfg.dataset, cfg.root, cfg.split, **dataset_kwargs(cfg)))
        spec = scan.class_weights()
    elif isinstance(spec, str):
        spec = load_class_weights(spec, data.classes)
    if len(spec) != k or not all(isinstance(w, (int, float)) and w >= 0 for w in spec):
        raise FcnsegError(f"class_weights: expected {k} non-negative numbers (one per class of {cfg.dataset}), "
                          f"got {len(spec)}")
    return torch.tensor([float(w) ** cfg.class_weight_power for w in spec], dtype=torch.float32)


def _probe_batch(data: Data, cfg: TrainConfig):
    """A batch of the run's training shape for the amp probe, or None when batches have no fixed shape.
    Random values: the time does not depend on them, and reading real samples here would count as reading
    them (``--skip-bad`` accounting, loader order)."""
    if not cfg.crop_size or cfg.crop_size == [0, 0] or getattr(data, "heads", None):
        return None  # whole images have no one shape; a multi-head run's masks are one map per head
    g = torch.Generator().manual_seed(cfg.seed)
    h, w = cfg.crop_size
    return (torch.randn(cfg.batch_size, 3, h, w, generator=g),
            torch.randint(0, data.num_classes, (cfg.batch_size, h, w), generator=g))


def _previous_amp(out: Path) -> dict[str, Any] | None:
    """The amp decision a run directory recorded when it started (a resumed run keeps its numerics)."""
    try:
        recorded = json.loads((out / "version.json").read_text()).get("amp")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) and recorded.get("dtype") in ("float32", "bfloat16", "float16") \
        else None


def setup_run(cfg: TrainConfig, info: dst.DistInfo, resume: bool = False,
              command: list[str] | None = None) -> Run:
    """Data, model, optimiser and position (restored from the newest good state when resuming), and the
    run directory opened for writing (rank 0)."""
    from ..registry import get_builder

    get_builder(cfg.model)  # a wrong name fails before any data is read
    if not resume and (Path(cfg.out) / "checkpoints" / "state-last.pt").exists():
        raise FcnsegError(f"{cfg.out} already holds a run; continue it with 'fcnseg train --resume {cfg.out}' "
                          f"or choose another --out")

    device = info.device
    torch.manual_seed(cfg.seed)  # the model is built from the same seed on every process
    data = build_data(cfg, info)
    model = build_net(cfg, data.num_classes, info)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weights = resolve_class_weights(cfg.class_weights, data, cfg)
    loss_fn = engine.SegmentationLoss(weights, cfg.loss_reduction, cfg.loss_sample, data.ignore_index).to(device)
    loss_fn = check_heads(cfg, data, model, loss_fn)

    per_rank = -(-len(data.train_indices) // info.world)
    batches_per_epoch = -(-per_rank // cfg.batch_size)
    steps_per_epoch = -(-batches_per_epoch // cfg.accumulate)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg)
    decision = _previous_amp(Path(cfg.out)) if resume and cfg.amp == "auto" else None
    if decision is None:
        dtype, decision = choose_amp(cfg, model, loss_fn, _probe_batch(data, cfg) if cfg.amp == "auto" else None,
                                     device)
        if info.enabled:  # every process trains in rank 0's precision
            shared = [decision]
            torch.distributed.broadcast_object_list(shared, src=0)
            decision = shared[0]
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[decision["dtype"]]
    log(info, f"amp {decision['amp']}: {decision['dtype']} ({decision['reason']}"
              + (f": best {decision['float32_step_s']} s/step float32, {decision['bfloat16_step_s']} s/step bf16)"
                 if "bfloat16_step_s" in decision else ")"))
    files = getattr(data.train, "files", None)
    names = [str(f[0]) for f in files] if files else [str(n) for n in getattr(data.train, "names",
                                                                               range(len(data.train)))]
    run = Run(cfg, info, data, model, net, loss_fn, optimizer, build_scheduler(optimizer, cfg, total_steps),
              torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
              engine.StepOptions(accumulate=cfg.accumulate, amp_dtype=dtype, grad_clip=cfg.grad_clip,
                                 on_nonfinite=cfg.on_nonfinite, channels_last=cfg.channels_last,
                                 exact_batch_norm=cfg.exact_batch_norm, progress=cfg.progress and info.main),
              batches_per_epoch, steps_per_epoch, total_steps, names, command=command, amp=decision)
    trained_s = 0.0
    if resume:
        trained_s = restore(run)
    else:
        torch.manual_seed(cfg.seed + info.rank)  # training-time randomness (dropout, loss sampling) per process
    run.stopped = run.pos.step >= total_steps
    open_run_dir(run, resume)
    run.started = time.perf_counter() - trained_s  # the run's clock (time budget, elapsed_s) goes on across resumes
    return run


def check_heads(cfg: TrainConfig, data: Data, model: nn.Module,
                loss_fn: engine.SegmentationLoss) -> nn.Module:
    """A multi-head net trains on a dataset with one label map per head, of the same names and class counts
    in the same order; then the loss is summed over heads (``engine.HeadsLoss``). Single-head runs: unchanged."""
    model_heads = getattr(model, "head_classes", None)
    if model_heads is None and data.heads is None:
        return loss_fn
    data_heads = {name: len(h["classes"]) for name, h in (data.heads or {}).items()}
    if model_heads is None or data.heads is None or dict(model_heads) != data_heads \
            or list(model_heads) != list(data_heads):
        what = f"heads {dict(model_heads)}" if model_heads else "one head"
        has = f"label maps {data_heads}" if data.heads else f"one label map ({data.num_classes} classes)"
        raise FcnsegError(f"{cfg.model} has {what} but {cfg.dataset} gives {has}; a multi-head net needs "
                          f"one label map per head (siftflow: dataset_kwargs labels: both; model_kwargs heads)")
    if cfg.class_weights is not None:
        raise FcnsegError("class_weights are for single-head runs; a multi-head net has one class list per head")
    return engine.HeadsLoss(loss_fn, list(model_heads))


def restore(run: Run) -> float:
    """Model, optimiser, schedule, position, history and random streams from the newest good state; returns
    the seconds the run had trained before."""
    state, path = load_state(run.ckpt_dir)
    samples = state.get("samples")
    if samples is not None and int(state["batch"]) and samples != len(run.data.train_indices):
        raise FcnsegError(f"{run.out}: the state was saved inside an epoch over {samples} training samples, "
                          f"but there are {len(run.data.train_indices)} now; the data changed since")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    batch = int(state["batch"])
    run.pos = Position(int(state["epoch"]), batch, int(state["step"]), list(state["order"]) if batch else None)
    run.skipped_steps = int(state.get("skipped", 0))
    run.history, run.best = list(state.get("history", [])), dict(state.get("best", {}))
    run.late_bad, run.filled_slots = list(state.get("late_bad", [])), int(state.get("filled_slots", 0))
    rngs = state["rng"]
    set_rng_state(rngs[run.info.rank] if isinstance(rngs, list) else rngs)
    log(run.info, f"resuming {run.out} from {path.name}: epoch {run.pos.epoch + 1}, batch {run.pos.batch}, "
                  f"step {run.pos.step}")
    return float(state.get("trained_s", 0.0))


def open_run_dir(run: Run, resume: bool) -> None:
    """Rank 0: config.yaml, version.json, metrics.jsonl (a resumed run drops lines written after its state),
    the TensorBoard writer, and the run's first log line."""
    if not run.info.main:
        return
    cfg, data = run.cfg, run.data
    run.code = report.code_version()
    run.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.out / "config.yaml")
    report.write_json(run.out / "version.json", dict(run.code, command=run.command, amp=run.amp))
    report.write_jsonl(run.out / "metrics.jsonl", run.history)
    run.writer = report.Scalars(run.out / "tensorboard", purge_step=run.pos.step if resume else None)
    log(run.info, f"run {run.out}: {cfg.model} on {cfg.dataset} ({len(data.train_indices)} train images, "
                  f"{len(data.val_indices) if data.val is not None else 0} val), {run.info.world} process(es) on "
                  f"{run.info.device}, {run.steps_per_epoch} steps/epoch, {run.total_steps} steps")


# ---- one epoch ------------------------------------------------------------------------------------------------
def _noting_problems(loader, sink: list) -> Iterator:
    """The loader's batches as ``(images, masks, indices)``; each slot a neighbour filled (the problems of the
    samples it stands for) goes to ``sink``."""
    for images, masks, indices, replaced in loader:
        sink.extend(replaced)
        yield images, masks, indices


def train_epoch(run: Run) -> engine.EpochStats:
    """Train from ``run.pos`` to the end of its epoch (or until max_steps / the time budget), saving the
    resume state every ``checkpoint_every_steps``; ``run.pos.step`` follows the steps taken."""
    cfg, info, pos = run.cfg, run.info, run.pos
    sampler = ShardSampler(len(run.data.train_indices), cfg.seed, pos.epoch, info.world, info.rank, shuffle=True,
                           start=pos.batch * cfg.batch_size, order=pos.order)
    pos.order = sampler.order
    loader = make_loader(Seeded(run.data.train, run.data.train_indices), sampler, cfg.batch_size, cfg.workers,
                         info.device)
    budget_s = cfg.time_budget_min * 60

    def after_step(global_step: int, b: int, stats: engine.EpochStats) -> bool:
        pos.step = global_step
        if run.writer is not None and (global_step % max(cfg.log_every, 1) == 0) and stats.losses:
            run.writer.add("train/loss", stats.losses[-1], global_step)
            run.writer.add("train/lr", run.optimizer.param_groups[0]["lr"], global_step)
        out_of_time = budget_s > 0 and run.elapsed() >= budget_s
        done = global_step >= run.total_steps or dst.broadcast_flag(out_of_time, info.device)
        if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0 and not done:
            save_resume_state(run, Position(pos.epoch, b, global_step, pos.order))
        return done

    replaced: list[tuple[str, ...]] = []
    try:
        stats = engine.train_one_epoch(
            run.net, _noting_problems(loader, replaced), run.loss_fn, run.optimizer, run.scheduler, run.scaler,
            device=info.device, options=run.options,
            start=engine.EpochStart(pos.epoch, pos.step, pos.batch, run.batches_per_epoch),
            names=run.names, after_step=after_step)
    except DataFileError as e:
        if cfg.skip_bad:
            raise
        raise DataFileError(f"{e}; fix or remove the file, or pass --skip-bad to leave bad samples out") from None
    note_replaced(run, replaced)
    return stats


def note_replaced(run: Run, slots: list[tuple[str, ...]]) -> None:
    """Count the batch slots filled by a neighbour because their sample went bad during the run (every
    process's), and log each such sample once per run."""
    if run.info.enabled and run.cfg.skip_bad:  # without skip_bad a bad sample raises, so there is nothing to gather
        gathered: list = [None] * run.info.world
        torch.distributed.all_gather_object(gathered, slots)
        slots = [slot for part in gathered for slot in part]
    run.filled_slots += len(slots)
    for message in dict.fromkeys(m for slot in slots for m in slot):
        if message not in run.late_bad:
            run.late_bad.append(message)
            log(run.info, f"skipped bad sample (it changed during the run; the next sample filled its place in "
                          f"the batch): {message}", logging.WARNING)


def epoch_row(run: Run, stats: engine.EpochStats) -> dict[str, Any]:
    """The epoch's metrics.jsonl row (training numbers summed over processes); counts skipped steps."""
    info = run.info
    loss_sum, correct, labelled, imgs = dst.all_reduce_sum(
        [stats.loss_sum, stats.correct, stats.labelled, stats.images], info.device)
    steps = stats.steps - stats.skipped  # the same on every process
    run.skipped_steps += stats.skipped
    row: dict[str, Any] = {
        "epoch": run.pos.epoch + 1, "step": run.pos.step,
        "train_loss": loss_sum / info.world / steps if steps else float("nan"),
        "train_pixel_accuracy": correct / labelled if labelled else float("nan"),
        "lr": run.optimizer.param_groups[0]["lr"], "skipped_steps": run.skipped_steps,
        **run.sample_counts(),
        "images_per_s": imgs / max(stats.seconds, 1e-9), "seconds": round(stats.seconds, 3),
        "elapsed_s": round(run.elapsed(), 1),  # wall time since the run began, evals included
    }
    if stats.stopped and run.pos.batch + stats.batches < run.batches_per_epoch:
        row["partial"] = True
    return row


def validation_due(run: Run, stats: engine.EpochStats) -> bool:
    epoch = run.pos.epoch + 1
    return run.data.val is not None and (stats.stopped or epoch % run.cfg.eval_every == 0 or epoch == run.cfg.epochs)


def validate(run: Run) -> dict[str, Any]:
    """Score the model on the validation split (sharded over processes, summed) and keep the scores.
    Single-head nets are scored as ``fcnseg evaluate`` scores them (``evaluate_model``: an optimized copy,
    equal-size images batched, loading overlapped); the training model itself is not touched."""
    from ..evaluation import evaluate_model

    cfg, info, data = run.cfg, run.info, run.data
    n = len(data.val_indices) if not cfg.val_limit else min(cfg.val_limit, len(data.val_indices))
    shard = list(range(info.rank, n, info.world))  # a plain shard: no padding, so no image counts twice
    if data.heads is not None:
        return validate_heads(run, make_loader(Seeded(data.val, data.val_indices), shard, 1, cfg.workers,
                                               info.device))
    # scored in float32 whatever the training autocast: the mean IU that picks the best checkpoint and closes the run
    # is the model's own, the one `fcnseg evaluate` reports for the file by default (bf16 scoring moved it by up to
    # a few tenths of a point), and a float32 pass over a val split costs seconds
    cm = evaluate_model(run.model, data.val, indices=[data.val_indices[i] for i in shard],
                        num_classes=data.num_classes, ignore_index=data.ignore_index, device=info.device, dtype=None,
                        channels_last=cfg.channels_last, workers=cfg.workers, progress=run.options.progress,
                        desc=f"val {run.pos.epoch + 1}")
    run.last_scores = cm.compute(class_names=data.classes)
    return run.last_scores


def validate_heads(run: Run, loader) -> dict[str, Any]:
    """A multi-head net's validation: one confusion matrix per head (``run.last_head_scores``); the first
    head's scores are the run's (``val`` in metrics.jsonl, mean IU for the best checkpoint)."""
    from ..models.multihead import evaluate_heads

    heads = run.data.heads
    cms = evaluate_heads(run.model, loader, run.data.ignore_index, run.info.device,
                         channels_last=run.cfg.channels_last)  # float32, as ``validate``
    run.last_head_scores = {name: cm.compute(class_names=heads[name]["classes"]) for name, cm in cms.items()}
    run.last_scores = next(iter(run.last_head_scores.values()))
    return run.last_scores


def head_rows(run: Run) -> dict[str, Any]:
    """A multi-head run's per-head validation numbers for metrics.jsonl (``val_heads``), with each head's
    label source (a derived label map is never reported as the dataset's own)."""
    heads = run.data.heads or {}
    return {name: dict({k: scores[k] for k in SUMMARY_KEYS}, label_source=heads[name].get("label_source"))
            for name, scores in run.last_head_scores.items()}


def _summary(scores: dict[str, Any]) -> dict[str, Any]:
    out = {k: scores[k] for k in SUMMARY_KEYS}
    out["per_class_iou"] = {r["name"]: r["iou"] for r in scores["per_class"]}
    return out


# ---- saving and reporting ---------------------------------------------------------------------------------------
def save_weights(run: Run, name: str, scores: dict[str, Any] | None, epoch: int) -> None:
    """``checkpoints/{name}.safetensors`` with its record: provenance, and the validation scores if any."""
    cfg, data = run.cfg, run.data
    provenance = {"command": run.command, "config": cfg.to_dict(), "code": run.code,
                  "dataset": cfg.dataset, "split": cfg.split, "epoch": epoch, "step": run.pos.step}
    metrics = dict(_summary(scores), split=cfg.val_split, epoch=epoch) if scores else {}
    files = getattr(data.train, "files", None)
    extra = {"working_size": median_image_size([f[0] for f in files])} if files else {}
    if data.heads is not None:
        extra.update(head_record(run, scores))
        if scores:
            metrics["heads"] = {name: dict(_summary(s), label_source=data.heads[name].get("label_source"))
                                for name, s in run.last_head_scores.items()}
    record = make_record(run.model, provenance=provenance, metrics=metrics, classes=data.classes,
                         colors=data.colors, mean=data.mean, std=data.std, **{k: v for k, v in extra.items() if v})
    save_checkpoint(run.model, run.ckpt_dir / f"{name}.safetensors", record)


def head_record(run: Run, scores: dict[str, Any] | None) -> dict[str, Any]:
    """The record's ``heads`` field of a multi-head run: every head's classes and colours, in order."""
    return {"heads": {name: {"classes": list(h["classes"]), "colors": [list(c) for c in h["colors"]]}
                      for name, h in run.data.heads.items()}}


def save_resume_state(run: Run, at: Position | None = None) -> None:
    """The resume state at ``at`` (default: ``run.pos``); collective when distributed, rank 0 writes."""
    at = at or run.pos
    rngs = rng_state()
    if run.info.enabled:  # every process's RNG state, gathered on rank 0
        gathered: list = [None] * run.info.world
        torch.distributed.all_gather_object(gathered, rngs)
        rngs = gathered
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": at.epoch,
             "batch": at.batch, "step": at.step, "order": list(at.order) if at.batch and at.order else [],
             "rng": rngs, "skipped": run.skipped_steps, "trained_s": run.elapsed(), "history": run.history,
             "best": run.best, "config": run.cfg.to_dict(), "samples": len(run.data.train_indices),
             "late_bad": run.late_bad, "filled_slots": run.filled_slots}
    if run.info.main:
        save_state(state, run.ckpt_dir)


def report_epoch(run: Run, row: dict[str, Any], scores: dict[str, Any] | None) -> None:
    """Rank 0: metrics.jsonl, TensorBoard, plots, the last (and a new best) weights, the epoch's log lines."""
    if not run.info.main:
        return
    cfg, data, epoch = run.cfg, run.data, row["epoch"]
    report.write_jsonl(run.out / "metrics.jsonl", run.history)
    if run.writer is not None:
        run.writer.add("epoch/train_loss", row["train_loss"], row["step"])
        run.writer.add("epoch/train_pixel_accuracy", row["train_pixel_accuracy"], row["step"])
        for k, v in row.get("val", {}).items():
            if k != "num_pixels":
                run.writer.add(f"val/{k}", v, row["step"])
    if cfg.plots and (scores is not None or data.val is None):  # plots follow the validations
        plots = run.out / "plots"
        report.plot_curves(run.history, plots / "curves.png")
        if scores is not None:
            report.plot_confusion(scores["confusion_matrix"], data.classes, plots / "confusion.png",
                                  title=f"validation, epoch {epoch}")
            n = min(cfg.vis_images, len(data.val_indices)) if data.heads is None else 0  # the grid draws one head
            if n:
                report.prediction_grid(run.model, data.val, data.val_indices[:n], run.info.device, data.colors,
                                       data.mean, data.std, plots / "val_grid.png", data.ignore_index)
    if scores is not None and data.heads is not None:
        for name, head_scores in run.last_head_scores.items():
            log(run.info, f"head {name} (labels: {data.heads[name].get('label_source')}):\n{format_table(head_scores)}")
    elif scores is not None:
        log(run.info, format_table(scores))
    save_weights(run, "last", scores, epoch)
    miou = scores["mean_iou"] if scores is not None else float("nan")
    if miou == miou and miou > run.best.get("mean_iou", -1.0):
        run.best = {"mean_iou": miou, "epoch": epoch, "step": row["step"]}
        save_weights(run, "best", scores, epoch)
    msg = f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4g}, {row['images_per_s']:.1f} img/s"
    if scores is not None:
        msg += f", val mIU {miou:.4f} (best {run.best['mean_iou']:.4f} @ {run.best['epoch']})" if run.best \
            else f", val mIU {miou:.4f}"
    log(run.info, msg)


def advance(run: Run, stats: engine.EpochStats) -> None:
    """Move ``run.pos`` past this epoch (or inside it, when stopped early) and share rank 0's best."""
    pos = run.pos
    finished_epoch = not stats.stopped or pos.batch + stats.batches >= run.batches_per_epoch
    run.pos = Position(pos.epoch + 1, 0, pos.step) if finished_epoch else \
        Position(pos.epoch, pos.batch + stats.batches, pos.step, pos.order)
    run.stopped = stats.stopped or pos.step >= run.total_steps
    if run.info.enabled:  # `best` lives on rank 0; every process keeps the same copy for the state
        holder = [run.best]
        torch.distributed.broadcast_object_list(holder, 0)
        run.best = holder[0]


def budget_shortfall(elapsed_s: float, steps_done: int, total_steps: int, steps_per_epoch: int,
                     budget_s: float) -> tuple[float, int] | None:
    """If the run, at the pace so far, will not take its ``total_steps`` within ``budget_s``: the minutes it
    would need and the whole epochs that fit (what to set ``epochs`` to, so the schedule ends in time);
    None when it fits, there is no budget, or nothing has been timed yet."""
    if budget_s <= 0 or steps_done <= 0 or elapsed_s <= 0:
        return None
    needed_s = elapsed_s / steps_done * total_steps
    if needed_s <= budget_s:
        return None
    return needed_s / 60, int(budget_s / elapsed_s * steps_done // max(steps_per_epoch, 1))


def warn_if_over_budget(run: Run) -> None:
    """Once per run, after an epoch: warn when the time budget will stop the run before its last step, since
    the learning-rate schedule (poly, cosine) then never reaches its end and the weights miss its low-rate
    phase; the warning says how many epochs fit at the pace measured."""
    cfg = run.cfg
    if run.budget_warned or run.done:
        return
    short = budget_shortfall(run.elapsed(), run.pos.step, run.total_steps, run.steps_per_epoch,
                             cfg.time_budget_min * 60)
    if short is not None:
        run.budget_warned = True
        needed_min, fits = short
        log(run.info, f"at this pace the run needs about {needed_min:.0f} min for its {run.total_steps} steps, so "
                      f"time_budget_min ({cfg.time_budget_min:g}) will stop it before its learning-rate schedule "
                      f"ends; about {fits} epochs fit (set epochs to that, or raise the budget)", logging.WARNING)


def finish(run: Run) -> dict[str, Any]:
    """Close the writer, say why the run stopped early, and return its summary."""
    if run.writer is not None:
        run.writer.close()
    dst.barrier()
    pos = run.pos
    if run.stopped and pos.epoch < run.cfg.epochs:
        log(run.info, f"stopped at step {pos.step} "
                      f"({'max_steps' if pos.step >= run.total_steps else 'time budget'} reached)")
    counts = run.sample_counts()
    if run.cfg.skip_bad:
        log(run.info, f"left out {counts['skipped_samples']} bad samples and {counts['listing_problems']} listing "
                      f"problems (--skip-bad); {counts['filled_slots']} batch slots filled by the next sample")
    base = {"epoch": pos.epoch, "step": pos.step, "total_steps": run.total_steps, "skipped_steps": run.skipped_steps,
            "amp": run.amp, **counts}
    if run.last_head_scores:  # a multi-head run: every head's scores, the first head's also at the top
        base["heads"] = {name: _summary(scores) for name, scores in run.last_head_scores.items()}
    return dict(_summary(run.last_scores), **base) if run.last_scores else base


# ---- the run ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _run_settings(cfg: TrainConfig, device: torch.device):
    """``threads`` and ``deterministic`` hold for the run only, and the global random streams the run seeds
    are given back afterwards: a library call leaves the caller's process as it found it."""
    threads, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            if cfg.deterministic:
                torch.backends.cudnn.benchmark = False
                torch.use_deterministic_algorithms(True, warn_only=True)
            yield
        finally:
            torch.set_num_threads(threads)
            torch.backends.cudnn.benchmark = bench
            torch.use_deterministic_algorithms(det, warn_only=det_warn)
            random.setstate(py)
            np.random.set_state(npy)


def fit(cfg: TrainConfig, resume: bool = False, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Train per ``cfg`` into the run directory ``cfg.out``; return the summary: the last validation scores
    (if any), ``epoch``, ``step``, ``skipped_steps``, ``skipped_samples``, ``listing_problems``, ``filled_slots``.
    ``command`` (the caller's command line) is recorded in version.json and the checkpoints' provenance.
    The process's allocator is left as it is: ``fcnseg train`` first calls
    ``fcnseg.optimize.reuse_freed_memory()`` (faster CPU steps), which a program calling ``fit`` may do too."""
    cfg.validate()
    output_dir(cfg.out, what="run directory")  # before any data is read
    info = dst.setup(cfg.device)
    restarts = dst.elastic_restarts(info)
    # torchrun --max-restarts started this process again after a failure: every rank continues from the
    # newest resume state the earlier attempt left (none yet: it starts afresh)
    resume = resume or (restarts > 0 and (Path(cfg.out) / "checkpoints" / "state-last.pt").exists())
    dst.record_elastic(cfg.out, info, restarts)
    try:
        with _run_settings(cfg, info.device):
            return _fit(cfg, info, resume, list(command) if command is not None else None)
    finally:
        dst.teardown()


def _fit(cfg: TrainConfig, info: dst.DistInfo, resume: bool, command: list[str] | None) -> dict[str, Any]:
    run = setup_run(cfg, info, resume, command)
    if resume and run.done:
        log(info, f"{run.out}: the run already finished (epoch {run.pos.epoch}, step {run.pos.step}); raise "
                  f"--epochs or --max-steps to train further")
    while not run.done:
        stats = train_epoch(run)
        row = epoch_row(run, stats)
        scores = validate(run) if validation_due(run, stats) else None
        if scores is not None:
            row["val"] = {k: scores[k] for k in SUMMARY_KEYS}
            if run.data.heads is not None:
                row["val_heads"] = head_rows(run)
        run.history.append(row)
        report_epoch(run, row, scores)
        advance(run, stats)
        save_resume_state(run)
        warn_if_over_budget(run)
    return finish(run)
