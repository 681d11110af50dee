"""Registries: one small generic ``Registry`` (a dict, a decorator that refuses duplicates, lookups whose
errors list the valid names), used for models here and for datasets in ``fcnseg.data``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

import torch.nn as nn

from .errors import FcnsegError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named builders of one ``kind`` ("model", "dataset"), each with optional metadata."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: register ``fn`` under ``name``; the same name twice is a bug (ValueError)."""

        def wrap(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return wrap

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plug-ins that register temporary entries); a missing name is an error."""
        if name not in self._items:
            raise FcnsegError(self._unknown(name))
        del self._items[name]
        del self._meta[name]

    @contextmanager
    def temporarily(self, name: str, fn: T, **meta: Any) -> Iterator[T]:
        """``fn`` registered under ``name`` for the duration of a ``with`` block."""
        self.register(name, **meta)(fn)
        try:
            yield fn
        finally:
            self.unregister(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        """The builder registered as ``name``, or a one-line ``FcnsegError`` listing the valid names."""
        if not isinstance(name, str) or name not in self._items:
            raise FcnsegError(self._unknown(name))
        return self._items[name]

    def meta(self, name: str) -> Mapping[str, Any]:
        self.get(name)
        return self._meta[name]

    def _unknown(self, name: object) -> str:
        return f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names()) or 'none registered'}"


# -- models --------------------------------------------------------------------------------------------

#: build arguments a checkpoint record may carry for an FCN, each with its check. Nothing here can
#: name a file, a URL or ImageNet weights: a record rebuilds an architecture, its weights come from
#: the checkpoint file itself.
FCN_RECORD_KWARGS: dict[str, Callable[[Any], bool]] = {
    "upsample": lambda v: v in ("deconv", "bilinear", "resize_conv", "unpool"),
    "in_channels": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16,  # RGB-D: 4
    "learnable_upsample": lambda v: isinstance(v, bool),
    "dropout": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
    "fc_channels": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16384,
    "fc_kernel": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 15,
}


HEAD_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_")
MAX_HEADS = 8


def valid_heads(value: Any) -> bool:
    """A multi-head net's ``heads``: 1..8 entries, names of 1..32 characters from [a-z_], class counts 1..65535."""
    return (isinstance(value, dict) and 1 <= len(value) <= MAX_HEADS
            and all(isinstance(n, str) and 1 <= len(n) <= 32 and set(n) <= HEAD_NAME_CHARS for n in value)
            and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 65535 for k in value.values()))


#: build arguments a record may carry for a multi-head FCN (``fcnseg.models.multihead``): its heads, and
#: how every head upsamples
MULTIHEAD_RECORD_KWARGS: dict[str, Callable[[Any], bool]] = {
    "heads": valid_heads,
    "upsample": lambda v: v in ("deconv", "bilinear", "resize_conv"),  # unpool has no skips; the heads have one
    **{k: FCN_RECORD_KWARGS[k] for k in ("learnable_upsample", "dropout")},
}

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str, record_kwargs: Mapping[str, Callable[[Any], bool]] | None = None):
    """Register a builder ``fn(num_classes=..., **kwargs) -> nn.Module`` under ``name``.

    ``record_kwargs``: the build arguments a checkpoint record may pass to it, with a check for each
    value (default: ``FCN_RECORD_KWARGS``); anything else in a record is refused when it is read.
    """
    return _MODELS.register(name, record_kwargs=dict(FCN_RECORD_KWARGS if record_kwargs is None else record_kwargs))


def unregister_model(name: str) -> None:
    """Take ``name`` out of the registry again (a plug-in or a test that registered a model for a while);
    an unknown name is the same one-line ``FcnsegError``, listing the valid names, as ``build_model`` raises."""
    _MODELS.unregister(name)


def temporarily_registered(name: str, builder: Callable[..., nn.Module], **meta: Any):
    """``with temporarily_registered("tiny", build): ...`` registers a model for the block only."""
    meta.setdefault("record_kwargs", dict(FCN_RECORD_KWARGS))
    return _MODELS.temporarily(name, builder, **meta)


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return _MODELS.names()


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of a registered model; an unknown name is a one-line ``FcnsegError`` listing valid names."""
    return _MODELS.get(name)


def record_kwargs(name: str) -> Mapping[str, Callable[[Any], bool]]:
    """The build arguments a checkpoint record may carry for model ``name``, with their checks."""
    return _MODELS.meta(name)["record_kwargs"]


def build_model(name: str, num_classes: int = 21, weights: Any = None, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``build_model("fcn8s_vgg16", num_classes=21)``.

    ``pretrained`` (for every backbone): False (random), True or "imagenet" (the backbone's ImageNet
    weights), or the path of a local file holding them; see ``fcnseg.models.imagenet``. ``weights``: trained
    weights for this architecture (``fcnseg.get_weights(...)``): the network comes from the weight file, built as
    its record says (``num_classes`` and other arguments are the record's), in eval mode with ``.record``.
    """
    if weights is not None:
        if weights.arch != name:
            raise FcnsegError(f"the weights {weights.name!r} are for {weights.arch}, not {name}; "
                              f"build_model({weights.arch!r}, weights=...)")
        return weights.load()
    model = get_builder(name)(num_classes=num_classes, **kwargs)
    # what a checkpoint record needs to rebuild the same network (weights come from the checkpoint)
    model.arch = name
    model.build_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_RECORDED}
    return model


# arguments that only say where the starting weights come from
_NOT_RECORDED = {"pretrained", "keep_fc8"}
