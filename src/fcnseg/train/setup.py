"""Building a training run: its data, network, class weights and optimiser from a ``TrainConfig``, and its state
(``Run``: what the loop advances and what resume restores), fresh or from the newest good resume state."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..record import IMAGENET_MEAN, IMAGENET_STD
from ..weights.checkpoint import load_checkpoint
from ..config import TrainConfig, save_config
from ..errors import FcnsegError
from . import distributed as dst
from . import engine, report
from .amp import choose_amp
from ..data.loader import scan_samples
from .optim import build_optimizer, build_scheduler
from .state import load_state, set_rng_state

logger = logging.getLogger(__name__)


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
