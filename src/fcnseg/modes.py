"""Train or eval mode for a block, without side effects on the caller's module.

``model.train(was_training)`` afterwards is not the same thing: it sets every submodule to one mode, so a
layer the caller had put in eval mode inside a training model (a frozen BatchNorm) would come back in
training mode. These restore each submodule's own mode, also when the block raises.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """``model`` in eval mode inside the block, every submodule back in its own mode afterwards."""
    return _mode(model, False)


def train_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """``model`` in training mode inside the block, every submodule back in its own mode afterwards."""
    return _mode(model, True)
