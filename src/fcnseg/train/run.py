"""A training run from a TrainConfig: data, model, optimiser, the epoch loop, the run directory, resume.

``fit(cfg)`` starts a run in ``cfg.out``; ``fit(cfg, resume=True)`` continues the run in
``cfg.out`` from its newest good state, exactly (same weights as an uninterrupted run on CPU).
It is a sequence of plain steps; the per-epoch work is ``engine.train_one_epoch`` and ``engine.evaluate``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .. import engine
from ..checkpoint import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, make_record, save_checkpoint
from ..config import TrainConfig, save_config
from ..errors import FcnsegError
from ..metrics import format_table
from ..outputs import output_dir
from . import distributed as dst
from . import report
from .loader import Seeded, ShardSampler, make_loader
from .optim import build_optimizer, build_scheduler
from .state import load_state, rng_state, save_state, set_rng_state

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


def log(info: dst.DistInfo, msg: str) -> None:
    if info.main:
        print(msg, file=sys.stderr, flush=True)


def build_data(cfg: TrainConfig) -> Data:
    """The training split with the dataset's training preset (flags override its crop and scales), and the
    validation split at original resolution."""
    from ..data import build_dataset, build_transforms

    train = build_dataset(cfg.dataset, cfg.root, cfg.split, **cfg.dataset_kwargs)
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
    val = build_dataset(cfg.dataset, cfg.root, cfg.val_split, **cfg.dataset_kwargs) if cfg.val_split else None
    if len(train) == 0:
        raise FcnsegError(f"{cfg.root}: the {cfg.split!r} split of {cfg.dataset} is empty")
    return Data(train, val, list(train.classes), [list(c) for c in train.colors], int(train.num_classes),
                int(getattr(train, "ignore_index", 255)), kw["mean"], kw["std"])


def build_net(cfg: TrainConfig, num_classes: int, info: dst.DistInfo) -> nn.Module:
    from ..models import transfer_weights
    from ..registry import build_model

    kwargs = dict(cfg.model_kwargs)
    if cfg.pretrained:
        kwargs["pretrained"] = True
    try:
        model = build_model(cfg.model, num_classes=num_classes, **kwargs)
    except KeyError as e:
        raise FcnsegError(str(e).strip("'\"")) from None
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

        scan = check_dataset(build_dataset(cfg.dataset, cfg.root, cfg.split, **cfg.dataset_kwargs))
        spec = scan.class_weights()
    elif isinstance(spec, str):
        spec = load_class_weights(spec, data.classes)
    if len(spec) != k or not all(isinstance(w, (int, float)) and w >= 0 for w in spec):
        raise FcnsegError(f"class_weights: expected {k} non-negative numbers (one per class of {cfg.dataset}), "
                          f"got {len(spec)}")
    return torch.tensor([float(w) ** cfg.class_weight_power for w in spec], dtype=torch.float32)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp:
        return None
    if cfg.amp_dtype == "fp16":
        return torch.float16
    if cfg.amp_dtype == "bf16" or device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _eval_loader(dataset, info: dst.DistInfo, cfg: TrainConfig, limit: int = 0):
    n = len(dataset) if not limit else min(limit, len(dataset))
    indices = list(range(info.rank, n, info.world))  # a plain shard: no padding, so no image counts twice
    return make_loader(Seeded(dataset), indices, 1, cfg.workers, info.device)


def _summary(scores: dict[str, Any]) -> dict[str, Any]:
    out = {k: scores[k] for k in SUMMARY_KEYS}
    out["per_class_iou"] = {r["name"]: r["iou"] for r in scores["per_class"]}
    return out


def fit(cfg: TrainConfig, resume: bool = False, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Train per ``cfg`` into the run directory ``cfg.out``; return the last validation summary."""
    cfg.validate()
    output_dir(cfg.out, what="run directory")  # before any data is read
    info = dst.setup(cfg.device)
    try:
        return _fit(cfg, info, resume, list(command) if command is not None else list(sys.argv))
    finally:
        dst.teardown()


def _fit(cfg: TrainConfig, info: dst.DistInfo, resume: bool, command: list[str]) -> dict[str, Any]:
    device = info.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    from ..registry import get_builder

    try:
        get_builder(cfg.model)  # a wrong name fails before any data is read
    except KeyError as e:
        raise FcnsegError(str(e).strip("'\"")) from None
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if not resume and (ckpt_dir / "state-last.pt").exists():
        raise FcnsegError(f"{out} already holds a run; continue it with 'fcnseg train --resume {out}' "
                          f"or choose another --out")

    # data and model (the model is built from the same seed on every process)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    model = build_net(cfg, data.num_classes, info)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weights = resolve_class_weights(cfg.class_weights, data, cfg)
    loss_fn = engine.SegmentationLoss(weights, cfg.loss_reduction, cfg.loss_sample, data.ignore_index).to(device)

    batch = cfg.batch_size
    per_rank = -(-len(data.train) // info.world)
    batches_per_epoch = -(-per_rank // batch)
    steps_per_epoch = -(-batches_per_epoch // cfg.accumulate)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # where we are
    epoch, batch_in_epoch, step, skipped, trained_s = 0, 0, 0, 0, 0.0
    history: list[dict] = []
    best: dict[str, Any] = {}
    order = None
    if resume:
        state, path = load_state(ckpt_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, batch_in_epoch, step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        skipped, trained_s = int(state.get("skipped", 0)), float(state.get("trained_s", 0.0))
        history, best = list(state.get("history", [])), dict(state.get("best", {}))
        order = list(state["order"]) if batch_in_epoch else None
        rngs = state["rng"]
        set_rng_state(rngs[info.rank] if isinstance(rngs, list) else rngs)
        log(info, f"resuming {out} from {path.name}: epoch {epoch + 1}, batch {batch_in_epoch}, step {step}")
    else:
        torch.manual_seed(cfg.seed + info.rank)  # training-time randomness (dropout, loss sampling) per process

    writer = None
    code = report.code_version() if info.main else {}
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        report.write_json(out / "version.json", dict(code, command=command))
        report.write_jsonl(out / "metrics.jsonl", history)  # a resumed run drops lines written after its state
        writer = report.Scalars(out / "tensorboard", purge_step=step if resume else None)
        log(info, f"run {out}: {cfg.model} on {cfg.dataset} ({len(data.train)} train images, "
                  f"{len(data.val) if data.val is not None else 0} val), {info.world} process(es) on {device}, "
                  f"{steps_per_epoch} steps/epoch, {total_steps} steps")

    record_base = dict(classes=data.classes, colors=data.colors, mean=data.mean, std=data.std)
    files = getattr(data.train, "files", None)
    names = [str(f[0]) for f in files] if files else [str(n) for n in getattr(data.train, "names", range(len(data.train)))]
    last_scores: dict[str, Any] = {}
    start_time = time.perf_counter() - trained_s
    budget_s = cfg.time_budget_min * 60

    def state_dict(epoch_: int, batch_: int, step_: int, order_: list[int]) -> dict[str, Any]:
        rngs = rng_state()
        if info.enabled:  # every process's RNG state, gathered on rank 0
            gathered: list = [None] * info.world
            torch.distributed.all_gather_object(gathered, rngs)
            rngs = gathered
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch_,
                "batch": batch_, "step": step_, "order": order_, "rng": rngs, "skipped": skipped,
                "trained_s": time.perf_counter() - start_time, "history": history, "best": best,
                "config": cfg.to_dict()}

    def save_resume_state(epoch_: int, batch_: int, step_: int, order_: list[int]) -> None:
        st = state_dict(epoch_, batch_, step_, order_)  # collective when distributed: every process calls it
        if info.main:
            save_state(st, ckpt_dir)

    def save_weights(name: str, scores: dict[str, Any] | None, epoch_: int) -> None:
        provenance = {"command": command, "config": cfg.to_dict(), "code": code,
                      "dataset": cfg.dataset, "split": cfg.split, "epoch": epoch_, "step": step}
        metrics = dict(_summary(scores), split=cfg.val_split, epoch=epoch_) if scores else {}
        record = make_record(model, provenance=provenance, metrics=metrics, **record_base)
        save_checkpoint(model, ckpt_dir / f"{name}.safetensors", record)

    stop = step >= total_steps
    if resume and (stop or epoch >= cfg.epochs):
        log(info, f"{out}: the run already finished (epoch {epoch}, step {step}); raise --epochs or --max-steps "
                  f"to train further")
    while epoch < cfg.epochs and not stop:
        sampler = ShardSampler(len(data.train), cfg.seed, epoch, info.world, info.rank, shuffle=True,
                               start=batch_in_epoch * batch, order=order)
        epoch_order = sampler.order
        loader = make_loader(Seeded(data.train), sampler, batch, cfg.workers, device)

        def after_step(global_step: int, b: int, stats: engine.EpochStats) -> bool:
            nonlocal step
            step = global_step
            if writer is not None and (global_step % max(cfg.log_every, 1) == 0) and stats.losses:
                writer.add("train/loss", stats.losses[-1], global_step)
                writer.add("train/lr", optimizer.param_groups[0]["lr"], global_step)
            out_of_time = budget_s > 0 and time.perf_counter() - start_time >= budget_s
            done = global_step >= total_steps or dst.broadcast_flag(out_of_time, device)
            if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0 and not done:
                save_resume_state(epoch, b, global_step, epoch_order)
            return done

        stats = engine.train_one_epoch(
            net, loader, loss_fn, optimizer, scheduler, device=device, epoch=epoch, global_step=step,
            batches_per_epoch=batches_per_epoch, start_batch=batch_in_epoch, accumulate=cfg.accumulate,
            scaler=scaler, amp_dtype=dtype, grad_clip=cfg.grad_clip, on_nonfinite=cfg.on_nonfinite, names=names,
            channels_last=cfg.channels_last, after_step=after_step, progress=cfg.progress and info.main)
        step_done = step
        loss_sum, correct, labelled, imgs = dst.all_reduce_sum(
            [stats.loss_sum, stats.correct, stats.labelled, stats.images], device)
        steps = stats.steps - stats.skipped  # the same on every process
        skipped += stats.skipped
        stop = stats.stopped
        finished_epoch = not stop or batch_in_epoch + stats.batches >= batches_per_epoch
        row: dict[str, Any] = {
            "epoch": epoch + 1, "step": step_done,
            "train_loss": loss_sum / info.world / steps if steps else float("nan"),
            "train_pixel_accuracy": correct / labelled if labelled else float("nan"),
            "lr": optimizer.param_groups[0]["lr"], "skipped_steps": skipped,
            "images_per_s": imgs / max(stats.seconds, 1e-9), "seconds": round(stats.seconds, 3),
            "elapsed_s": round(time.perf_counter() - start_time, 1),  # wall time since the run began, evals included
        }
        if not finished_epoch:
            row["partial"] = True
        if data.val is not None and (stop or (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            cm = engine.evaluate(net if not info.enabled else model, _eval_loader(data.val, info, cfg, cfg.val_limit),
                                 data.num_classes, device=device, ignore_index=data.ignore_index, amp_dtype=dtype,
                                 channels_last=cfg.channels_last, progress=cfg.progress and info.main,
                                 desc=f"val {epoch + 1}")
            last_scores = cm.compute(class_names=data.classes)
            row["val"] = {k: last_scores[k] for k in SUMMARY_KEYS}
            if info.main:
                log(info, format_table(last_scores))
        history.append(row)
        epoch_next, batch_next = (epoch + 1, 0) if finished_epoch else (epoch, batch_in_epoch + stats.batches)

        if info.main:
            _report_epoch(out, row, history, writer, last_scores if "val" in row else None, data, model, device, cfg)
            save_weights("last", last_scores if "val" in row else None, epoch + 1)
            if "val" in row and row["val"]["mean_iou"] == row["val"]["mean_iou"] and \
                    row["val"]["mean_iou"] > best.get("mean_iou", -1.0):
                best = {"mean_iou": row["val"]["mean_iou"], "epoch": epoch + 1, "step": step_done}
                save_weights("best", last_scores, epoch + 1)
            msg = f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4g}, {row['images_per_s']:.1f} img/s"
            if "val" in row:
                msg += f", val mIU {row['val']['mean_iou']:.4f} (best {best['mean_iou']:.4f} @ {best['epoch']})" \
                    if best else f", val mIU {row['val']['mean_iou']:.4f}"
            log(info, msg)
        if info.enabled:  # `best` lives on rank 0; every process keeps the same copy for the state
            holder = [best]
            torch.distributed.broadcast_object_list(holder, 0)
            best = holder[0]
        save_resume_state(epoch_next, batch_next, step_done, epoch_order if batch_next else [])
        epoch, batch_in_epoch, order = epoch_next, batch_next, None
        stop = stop or step_done >= total_steps
    if writer is not None:
        writer.close()
    dst.barrier()
    if info.main and stop and epoch < cfg.epochs:
        log(info, f"stopped at step {step} ({'max_steps' if step >= total_steps else 'time budget'} reached)")
    return dict(_summary(last_scores), epoch=epoch, step=step, skipped_steps=skipped) if last_scores else \
        {"epoch": epoch, "step": step, "skipped_steps": skipped}


def _report_epoch(out: Path, row: dict, history: list[dict], writer, scores, data: Data, model, device, cfg) -> None:
    report.write_jsonl(out / "metrics.jsonl", history)
    if writer is not None:
        writer.add("epoch/train_loss", row["train_loss"], row["step"])
        writer.add("epoch/train_pixel_accuracy", row["train_pixel_accuracy"], row["step"])
        for k, v in row.get("val", {}).items():
            if k != "num_pixels":
                writer.add(f"val/{k}", v, row["step"])
    if not cfg.plots or (scores is None and data.val is not None):  # plots follow the validations
        return
    plots = out / "plots"
    report.plot_curves(history, plots / "curves.png")
    if scores is not None:
        report.plot_confusion(scores["confusion_matrix"], data.classes, plots / "confusion.png",
                              title=f"validation, epoch {row['epoch']}")
        n = min(cfg.vis_images, len(data.val))
        if n:
            report.prediction_grid(model, data.val, list(range(n)), device, data.colors, data.mean, data.std,
                                   plots / "val_grid.png", data.ignore_index)
