"""The checkpoint record: what a weight file says about itself, parsed once into a typed, checked value.

A record rebuilds an architecture (``arch``, ``num_classes``, ``model_kwargs``) and says what its
outputs mean (``classes``, ``colors``) and how inputs are prepared (``normalization``). It is read from
files people exchange, so every field is checked here, with a one-line ``FcnsegError`` naming the
file and the field; code behind this boundary trusts a ``CheckpointRecord``.

A record can never make fcnseg read anything beyond the checkpoint file: ``model_kwargs`` pass
through a per-architecture allowlist (``fcnseg.registry.record_kwargs``) that has no ImageNet
weights, paths or URLs in it.

``CheckpointRecord`` is also a read-only mapping of the record's JSON fields (``record["arch"]``,
``record.get("metrics")``), so code and tools that read the JSON keep working.

The preprocessing of a weight file's inputs is one object for every path, here beside the normalisation it
applies: ``PairedTransform`` turns ``(image, mask)`` into the normalised float image and int64 mask a network takes
(datasets, evaluation) and ``.batch(images)`` normalises an image batch (``Segmenter``, the service, the ONNX
Runtime / OpenVINO paths). ``CheckpointRecord.transforms()`` (and ``Weights.transforms()``) build the evaluation one
from a record; the datasets' training presets (``fcnseg.data.transforms``) add augmentation in front of it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .errors import FcnsegError

FORMAT = "fcnseg-checkpoint/1"
MAX_CLASSES = 65535
MAX_RECORD_BYTES = 16 << 20  # the built-in records are ~10 KB; a larger one is not a record
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STORED_DTYPES = ("float32", "float16", "bfloat16")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def default_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map (bit-interleaved), which gives distinct colours for any n."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


def class_colors(colors: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the given ones, completed with the VOC palette where missing."""
    base = default_palette(num_classes)
    given = [list(map(int, c)) for c in (colors or [])][:num_classes]
    return np.array(given + base[len(given):], dtype=np.uint8).reshape(num_classes, 3)


class CheckpointRecord(Mapping):
    """A checked checkpoint record. Build it with ``CheckpointRecord.parse(data, source)``.

    Typed attributes: ``arch``, ``num_classes``, ``model_kwargs``, ``classes``, ``colors``, ``mean``,
    ``std``, ``stored_dtype``, ``top_stride`` (None when the record does not say), ``metrics``,
    ``provenance``. The mapping view gives the JSON fields, with defaults filled in.
    """

    __slots__ = ("_data", "source")

    def __init__(self, data: dict[str, Any], source: str) -> None:  # use parse(): this trusts ``data``
        self._data = data
        self.source = source

    # -- parsing ---------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: Any, source: str | Path = "record") -> "CheckpointRecord":
        """Check every field of a record (a dict from JSON) and fill defaults; raise a one-line
        ``FcnsegError`` '<source>: record field <name>: <problem>' at the first bad field."""
        src = str(source)

        def bad(field: str, problem: str) -> FcnsegError:
            return FcnsegError(f"{src}: record field {field!r}: {problem}")

        if isinstance(data, CheckpointRecord):
            data = data.to_dict()
        if not isinstance(data, dict):
            raise FcnsegError(f"{src}: the record is a JSON {type(data).__name__}, not an object")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise bad("format", f"{str(fmt)[:40]!r} is not {FORMAT!r} (written by another program or version)")

        arch, k, kwargs = _parse_build(data, bad)
        classes, colors = _parse_outputs(data, k, bad)
        heads = _parse_heads(data, kwargs, classes, colors, bad)
        mean, std = _parse_normalization(data, bad)
        _check_optional_fields(data, bad)

        out = dict(data)
        out.update(format=FORMAT, arch=arch, num_classes=k, model_kwargs=dict(kwargs), classes=list(classes),
                   colors=[list(c) for c in colors],
                   normalization={"mean": [float(v) for v in mean], "std": [float(v) for v in std]})
        if heads:
            out["heads"] = heads
        return cls(out, src)

    @classmethod
    def from_json(cls, text: str | bytes, source: str | Path = "record") -> "CheckpointRecord":
        """Parse a record from JSON text; broken JSON is a one-line error."""
        if len(text) > MAX_RECORD_BYTES:
            raise FcnsegError(f"{source}: the record is {len(text)} bytes; a record is at most {MAX_RECORD_BYTES}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
            raise FcnsegError(f"{source}: the record is not valid JSON ({msg})") from None
        return cls.parse(data, source)

    # -- typed view -----------------------------------------------------------------------------------

    @property
    def arch(self) -> str:
        return self._data["arch"]

    @property
    def num_classes(self) -> int:
        return self._data["num_classes"]

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self._data["model_kwargs"])

    @property
    def classes(self) -> list[str]:
        return list(self._data["classes"])

    @property
    def colors(self) -> list[list[int]]:
        return [list(c) for c in self._data["colors"]]

    @property
    def heads(self) -> dict[str, dict[str, list]] | None:
        """A multi-head net's heads in order, ``{name: {"classes": [...], "colors": [[r, g, b], ...]}}``; None
        for a single-head net."""
        heads = self._data.get("heads")
        return json.loads(json.dumps(heads)) if heads else None

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self._data["normalization"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self._data["normalization"]["std"])

    @property
    def in_channels(self) -> int:
        return len(self.mean)

    @property
    def stored_dtype(self) -> str:
        return self._data.get("stored_dtype", "float32")

    @property
    def top_stride(self) -> int | None:
        return self._data.get("top_stride")

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self._data.get("metrics", {}))

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._data.get("provenance", {}))

    def transforms(self) -> "PairedTransform":
        """The evaluation transform for this model's inputs: ``(PIL image, PIL mask) -> (tensor, tensor)``,
        normalised with the record's mean and std at the original resolution."""
        return PairedTransform([], None, self.mean, self.std)

    def normalize(self, x):
        """A float image batch (B, C, H, W) in 0..1, normalised with the record's mean and std (``transforms().batch``)."""
        return self.transforms().batch(x)

    # -- mapping and JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the record as JSON-ready data."""
        return json.loads(json.dumps(self._data))

    def replace(self, **fields: Any) -> "CheckpointRecord":
        """A new record with ``fields`` changed, checked again."""
        return CheckpointRecord.parse({**self.to_dict(), **fields}, self.source)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"CheckpointRecord(arch={self.arch!r}, num_classes={self.num_classes}, source={self.source!r})"


def _parse_build(data: dict, bad) -> tuple[str, int, dict]:
    """``arch`` (registered), ``num_classes`` (1..MAX_CLASSES) and ``model_kwargs`` (the builder's allowlist)."""
    from .registry import list_models, record_kwargs

    arch = data.get("arch")
    if not isinstance(arch, str):
        raise bad("arch", "missing" if arch is None else f"must be a model name, got {type(arch).__name__}")
    if arch not in list_models():
        raise bad("arch", f"{arch[:60]!r} is not a registered model (see 'fcnseg models')")
    k = data.get("num_classes")
    if not _is_int(k) or not 1 <= k <= MAX_CLASSES:
        raise bad("num_classes", f"must be a whole number from 1 to {MAX_CLASSES}, got {str(k)[:40]!r}")
    kwargs = data.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise bad("model_kwargs", f"must be an object, got {type(kwargs).__name__}")
    allowed = record_kwargs(arch)
    for name, value in kwargs.items():
        if name not in allowed:
            raise bad("model_kwargs", f"{str(name)[:40]!r} is not a build argument a record may set for {arch} "
                                      f"(allowed: {', '.join(sorted(allowed)) or 'none'})")
        if not allowed[name](value):
            raise bad("model_kwargs", f"{name}={str(value)[:40]!r} is not a valid value")
    return arch, k, kwargs


def _parse_outputs(data: dict, k: int, bad) -> tuple[list, list]:
    """``classes`` and ``colors``: one printable name and one [r, g, b] per class (defaults filled in)."""
    classes = data.get("classes", [f"class_{i}" for i in range(k)])
    if not isinstance(classes, list) or not all(isinstance(c, str) and 0 < len(c) <= 200 and c.isprintable()
                                                for c in classes):
        raise bad("classes", "must be a list of class names (printable text, 1 to 200 characters)")
    if len(classes) != k:
        raise bad("classes", f"{len(classes)} names for {k} classes")
    colors = data.get("colors", default_palette(k))
    if not isinstance(colors, list) or not all(
            isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c) for c in colors):
        raise bad("colors", "must be a list of [r, g, b] triples of whole numbers 0..255")
    if len(colors) != k:
        raise bad("colors", f"{len(colors)} colours for {k} classes")
    return classes, colors


def _parse_normalization(data: dict, bad) -> tuple[list, list]:
    """``normalization``: finite ``mean`` and positive ``std``, one number each per input channel."""
    norm = data.get("normalization", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    if not isinstance(norm, dict):
        raise bad("normalization", "must be an object with 'mean' and 'std'")
    mean, std = norm.get("mean"), norm.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and 1 <= len(mean) <= 8 and len(mean) == len(std)
            and all(_is_number(v) for v in mean) and all(_is_number(v) and v > 0 for v in std)):
        raise bad("normalization", "needs 'mean' and 'std' lists of equal length (one number per input "
                                   "channel), every std above 0")
    return mean, std


def _check_optional_fields(data: dict, bad) -> None:
    """The fields a record may leave out: stored_dtype, top_stride, working_size, and the JSON objects."""
    stored = data.get("stored_dtype", "float32")
    if stored not in STORED_DTYPES:
        raise bad("stored_dtype", f"{str(stored)[:40]!r} is not one of {', '.join(STORED_DTYPES)}")
    top = data.get("top_stride")
    if top is not None and (not _is_int(top) or not 1 <= top <= 1024):
        raise bad("top_stride", f"must be a whole number from 1 to 1024, got {str(top)[:40]!r}")
    size = data.get("working_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(_is_int(v) and 1 <= v <= 100000 for v in size)):
        raise bad("working_size", "must be [height, width] in pixels, whole numbers from 1 to 100000")
    for field in ("metrics", "provenance", "quantization", "precision_gate"):
        if field in data and not isinstance(data[field], dict):
            raise bad(field, f"must be an object, got {type(data[field]).__name__}")


def _parse_heads(data: dict, kwargs: dict, classes: list, colors: list, bad) -> dict[str, Any] | None:
    """The ``heads`` field of a multi-head net: ``{name: {"classes": [...], "colors": [...]}}`` in the order of
    ``model_kwargs["heads"]`` (names and class counts must agree with it). ``num_classes``, ``classes`` and
    ``colors`` are the first head's, so single-head readers of the record see one consistent head."""
    heads = data.get("heads")
    if heads is None:
        return None
    counts = kwargs.get("heads")
    if not isinstance(heads, dict) or not isinstance(counts, dict):
        raise bad("heads", "must be an object {head: {classes, colors}}, for a net built with model_kwargs heads")
    if list(heads) != list(counts):
        raise bad("heads", f"names {list(heads)[:8]} differ from model_kwargs heads {list(counts)}")
    out = {}
    for name, head in heads.items():
        if not isinstance(head, dict):
            raise bad("heads", f"{name}: must be an object with 'classes' and 'colors'")
        names, cols = head.get("classes"), head.get("colors", default_palette(counts[name]))
        if not isinstance(names, list) or not all(isinstance(c, str) and 0 < len(c) <= 200 and c.isprintable()
                                                  for c in names) or len(names) != counts[name]:
            raise bad("heads", f"{name}: 'classes' must list {counts[name]} class names (printable, 1 to 200 "
                               f"characters)")
        if not isinstance(cols, list) or len(cols) != counts[name] or not all(
                isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c) for c in cols):
            raise bad("heads", f"{name}: 'colors' must be {counts[name]} [r, g, b] triples of whole numbers 0..255")
        out[name] = {"classes": list(names), "colors": [list(c) for c in cols]}
    first = next(iter(out.values()))
    if first["classes"] != list(classes) or first["colors"] != [list(c) for c in colors]:
        raise bad("heads", "the first head's classes and colours must be the record's 'classes' and 'colors'")
    return out


def normalization_of(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model's inputs are normalised with: its record's, or ImageNet's for a model
    without one (a foreign ONNX file, a network built in code)."""
    record = getattr(model, "record", None)
    if isinstance(record, CheckpointRecord):
        return record.mean, record.std
    return IMAGENET_MEAN, IMAGENET_STD


def refuse_multihead(model: Any, what: str) -> None:
    """A one-line refusal where a single-output path meets a multi-head net (one mask per head is
    ``fcnseg predict``'s job)."""
    record = getattr(model, "record", None)
    heads = list(record.get("heads") or []) if isinstance(record, Mapping) else []
    modules = getattr(model, "heads", None)  # MultiHeadFCN.heads: an nn.ModuleDict
    if not heads and hasattr(modules, "keys"):
        heads = list(modules.keys())
    if heads:
        names = ", ".join(heads)
        raise FcnsegError(f"{what} takes a single-output model; this one has heads ({names}): segment it with "
                          f"'fcnseg predict', which writes one mask per head")


# -- the preprocessing of a record's inputs ---------------------------------------------------------------

class PairedTransform:
    """``(image, mask) -> (float32 (C, H, W) normalised, int64 (H, W))``.

    ``image``: a PIL image, or a (C, H, W) tensor (uint8, or float in [0, 1]; C may be 4 for RGB-D, in
    which case photometric jitter touches the first three channels only). ``mask``: a PIL ``L`` image,
    an ndarray or a tensor of class ids with 255 = ignore.
    """

    def __init__(self, geometric: Sequence[v2.Transform], photometric: v2.Transform | None,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.geometric = v2.Compose(list(geometric)) if geometric else None
        self.photometric = photometric
        self.to_float = v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                                   scale=True)
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))
        self.mean, self.std = tuple(mean), tuple(std)
        # uint8 straight to normalised float in one pass each: (x - 255 mean) / (255 std)
        self._shift = torch.tensor([255.0 * m for m in mean]).reshape(-1, 1, 1)
        self._scale = torch.tensor([255.0 * d for d in std]).reshape(-1, 1, 1)

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(F.pil_to_tensor(image) if isinstance(image, Image.Image) else image)
        if isinstance(mask, Image.Image):
            mask = np.array(mask)  # writable copy for torch
        mask = tv_tensors.Mask(torch.as_tensor(mask))
        if len(self.mean) != image.shape[0]:
            raise FcnsegError(f"transform normalises {len(self.mean)} channels but the image has {image.shape[0]}; "
                              f"pass the dataset's mean/std (dataset.mean, dataset.std) to build_transforms")
        if self.geometric is not None:  # on uint8 where possible: resampling is cheapest there
            image, mask = self.geometric(image, mask)
        if self.photometric is None and image.dtype == torch.uint8:  # evaluation: no jitter in between
            mask = mask.to(torch.int64)
            return (image.as_subclass(torch.Tensor).to(torch.float32).sub_(self._shift).div_(self._scale),
                    mask.as_subclass(torch.Tensor))
        image, mask = self.to_float(image, mask)
        if self.photometric is not None:  # on float: cheaper than v2's uint8 path, and clamped to [0, 1]
            if image.shape[0] == 3:
                image = self.photometric(image)
            else:  # RGB-D: jitter colour, leave depth alone
                rgb = self.photometric(tv_tensors.Image(image[:3]))
                image = tv_tensors.Image(torch.cat([rgb, image[3:]]))
        image = self.normalize(image)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch (B, C, H, W), uint8 or float in [0, 1], normalised: the inference path (``Segmenter``, the
        service, exported models run by a runtime), on ``x``'s device."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"PairedTransform(geometric={self.geometric}, photometric={self.photometric}, mean={self.mean}, std={self.std})"
