"""Model registry: a dict of builder functions, a decorator that refuses duplicates, and lookups."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name``; registering the same name twice is a bug."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def unregister_model(name: str) -> None:
    """Take ``name`` out of the registry again (a plugin or a test that registered a model for a while).

    An unknown name is the same KeyError, listing the valid names, as ``build_model`` raises.
    """
    get_builder(name)
    del _MODELS[name]


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def get_builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None


def build_model(name: str, num_classes: int = 21, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``build_model("fcn8s_vgg16", num_classes=21)``."""
    model = get_builder(name)(num_classes=num_classes, **kwargs)
    # what a checkpoint record needs to rebuild the same network (weights come from the checkpoint)
    model.arch = name
    model.build_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_RECORDED}
    return model


# arguments that only say where the starting weights come from
_NOT_RECORDED = {"pretrained", "keep_fc8"}
