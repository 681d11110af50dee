"""A training run from a TrainConfig: data, model, optimiser, the epoch loop, the run directory, resume.

``fit(cfg)`` starts a run in ``cfg.out``; ``fit(cfg, resume=True)`` continues the run in
``cfg.out`` from its newest good state, exactly (same weights as an uninterrupted run on CPU).
``fcnseg.train.setup.setup_run`` builds a ``Run`` (everything one run holds); the loop in ``_fit`` is a few plain steps over
it: ``train_epoch``, ``epoch_row``, ``validate``, ``report_epoch``, ``save_resume_state``. The per-epoch
work is ``engine.train_one_epoch`` and ``fcnseg.evaluation.loop``. Messages go to the ``fcnseg`` logger, from
rank 0 only; the CLI shows them on stderr.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..config import TrainConfig
from ..data.io import DataFileError
from ..evaluation.metrics import format_table
from ..files import output_dir
from . import distributed as dst
from . import engine, report
from ..data.loader import Seeded, ShardSampler, make_loader
from .checkpointing import SUMMARY_KEYS, save_resume_state, save_weights, summary
from .setup import Position, Run, log, setup_run

logger = logging.getLogger(__name__)


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
    from ..evaluation.loop import evaluate_model

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
    from ..evaluation.loop import evaluate

    heads = run.data.heads
    cms = evaluate(run.model, loader, device=run.info.device, ignore_index=run.data.ignore_index,
                   channels_last=run.cfg.channels_last, progress=False)  # float32, as ``validate``
    run.last_head_scores = {name: cm.compute(class_names=heads[name]["classes"]) for name, cm in cms.items()}
    run.last_scores = next(iter(run.last_head_scores.values()))
    return run.last_scores


def head_rows(run: Run) -> dict[str, Any]:
    """A multi-head run's per-head validation numbers for metrics.jsonl (``val_heads``), with each head's
    label source (a derived label map is never reported as the dataset's own)."""
    heads = run.data.heads or {}
    return {name: dict({k: scores[k] for k in SUMMARY_KEYS}, label_source=heads[name].get("label_source"))
            for name, scores in run.last_head_scores.items()}


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
        base["heads"] = {name: summary(scores) for name, scores in run.last_head_scores.items()}
    return dict(summary(run.last_scores), **base) if run.last_scores else base


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
    ``fcnseg.hardware.reuse_freed_memory()`` (faster CPU steps), which a program calling ``fit`` may do too."""
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
