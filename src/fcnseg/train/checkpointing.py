"""Checkpointing a training run: the weights (``last``/``best`` .safetensors with their record) and the resume
state, each through one writer."""
from __future__ import annotations

from typing import Any

import torch

from ..data.io import median_image_size
from ..hardware import cpu_description
from ..weights.checkpoint import make_record, save_checkpoint
from .setup import Position, Run
from .state import rng_state, save_state

SUMMARY_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "precision_macro", "recall_macro",
                "f1_macro", "f1_weighted", "num_pixels")


def summary(scores: dict[str, Any]) -> dict[str, Any]:
    """The headline scores of a record's ``metrics`` (``SUMMARY_KEYS``) and the IoU of each class by name."""
    out = {k: scores[k] for k in SUMMARY_KEYS}
    out["per_class_iou"] = {r["name"]: r["iou"] for r in scores["per_class"]}
    return out


def save_weights(run: Run, name: str, scores: dict[str, Any] | None, epoch: int) -> None:
    """``checkpoints/{name}.safetensors`` with its record: provenance, and the validation scores if any."""
    cfg, data = run.cfg, run.data
    provenance = {"command": run.command, "config": cfg.to_dict(), "code": run.code,
                  "dataset": cfg.dataset, "split": cfg.split, "epoch": epoch, "step": run.pos.step,
                  "cpu": cpu_description(), "device": str(run.info.device)}
    metrics = dict(summary(scores), split=cfg.val_split, epoch=epoch) if scores else {}
    files = getattr(data.train, "files", None)
    extra = {"working_size": median_image_size([f[0] for f in files])} if files else {}
    if data.heads is not None:
        extra.update(head_record(run, scores))
        if scores:
            metrics["heads"] = {name: dict(summary(s), label_source=data.heads[name].get("label_source"))
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
