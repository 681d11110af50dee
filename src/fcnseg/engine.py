"""Kept for imports written before the move: the epoch functions live in ``fcnseg.train.engine``."""
from .train.engine import (EpochStart, EpochStats, NonFiniteLossError, SegmentationLoss, StepOptions, autocast,
                           evaluate, train_one_epoch)

__all__ = ["EpochStart", "EpochStats", "NonFiniteLossError", "SegmentationLoss", "StepOptions", "autocast", "evaluate",
           "train_one_epoch"]
