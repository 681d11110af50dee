"""Optimisers (SGD, Adam, AdamW) with the paper's bias treatment, and step-based LR schedules."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import TrainConfig


def param_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_mult: float = 1.0,
                 bias_decay: bool = True) -> list[dict]:
    """Two groups: weights, and biases (with norm-layer parameters: every tensor of one dimension).

    The paper's Caffe nets give biases twice the learning rate and no weight decay
    (``bias_lr_mult=2, bias_decay=False``). Frozen parameters (e.g. fixed bilinear upsampling) are left out.
    """
    weights, biases = [], []
    for p in model.parameters():
        if p.requires_grad:
            (biases if p.ndim <= 1 else weights).append(p)
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
    if biases:
        groups.append({"params": biases, "lr": lr * bias_lr_mult, "weight_decay": weight_decay if bias_decay else 0.0,
                       "name": "biases"})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser, with torch's fused step where it has one for these parameters (one kernel
    over all tensors instead of a loop of small ones), else its multi-tensor (foreach) step."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.bias_lr_mult, cfg.bias_decay)
    if cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        # torch's Adam adds weight decay to the gradient (L2); AdamW decouples it
        cls, kwargs = torch.optim.Adam, dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    else:
        cls, kwargs = torch.optim.AdamW, dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    for fast in ({"fused": True}, {"foreach": True}):
        try:
            return cls(groups, **kwargs, **fast)
        except (RuntimeError, TypeError, ValueError):  # not for this device, dtype or torch version
            continue
    return cls(groups, **kwargs)


def lr_factor(step: int, total_steps: int, schedule: str = "poly", warmup_steps: int = 0,
              warmup_factor: float = 0.001, poly_power: float = 0.9, min_lr: float = 0.0) -> float:
    """The multiplier of the base learning rate before optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        a = step / warmup_steps
        return warmup_factor * (1 - a) + a
    if schedule == "fixed":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        return min_lr + (1 - min_lr) * (1 - t) ** poly_power
    if schedule == "cosine":
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """A LambdaLR stepped once per optimiser step; its state dict holds only numbers (resumable)."""

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, cfg.schedule, cfg.warmup_steps, cfg.warmup_factor, cfg.poly_power,
                         cfg.min_lr)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
