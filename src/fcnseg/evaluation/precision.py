"""Precision chosen by the task metric: how much mean IU a bfloat16 or int8 model loses on labelled
data (``miou_change``), and which layers cost it (``layer_sensitivity``), so that those stay float32.

Pixel agreement with the float32 model is not the user's measure: a change that moves 0.5% of the
pixels may cost nothing or a whole small class. Both functions score with
``fcnseg.evaluation.evaluate_model`` (the path ``fcnseg evaluate`` takes) and report mean IU.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import FcnsegError
from .loop import evaluate_model
from ..inference.optimize import CastInputs, FCN_FLOAT32_PARTS, copy_model, optimize

PRECISIONS = ("bfloat16", "int8")
DEFAULT_MAX_MIOU_DROP = 0.3  # points of mean IU (issue 16)


@dataclass(frozen=True)
class MiouChange:
    """Mean IU (fractions in [0, 1]) of a reference and a candidate model on the same images."""

    reference: float
    candidate: float
    images: int

    @property
    def drop_points(self) -> float:
        """How many points of mean IU the candidate loses (negative: it gains)."""
        return 100 * (self.reference - self.candidate)

    def exceeds(self, max_drop_points: float) -> bool:
        """Whether the candidate loses more than ``max_drop_points``; an undefined score always does."""
        return math.isnan(self.drop_points) or self.drop_points > max_drop_points

    def describe(self) -> str:
        return (f"mean IU on {self.images} image(s): float32 {100 * self.reference:.2f}, candidate "
                f"{100 * self.candidate:.2f}, change {-self.drop_points:+.2f} points")


def labelled_dataset(name: str, root: str | Path, split: str, model: Any):
    """The ``split`` of dataset ``name`` at ``root``, normalised as ``model`` expects (its record), the
    way ``fcnseg evaluate`` reads it; a one-line error when its classes do not fit the model."""
    from ..data import build_dataset, build_transforms
    from ..record import normalization_of

    dataset = build_dataset(name, root, split)
    mean, std = normalization_of(model)
    dataset.transforms = build_transforms(getattr(dataset, "preset", name), train=False, mean=mean, std=std)
    if dataset.num_classes != model.num_classes:
        raise FcnsegError(f"the model predicts {model.num_classes} classes but {name} has {dataset.num_classes}; "
                          f"gate on the dataset it was trained for")
    return dataset


def _indices(dataset, indices: Sequence[int] | None, limit: int | None) -> list[int]:
    chosen = list(range(len(dataset))) if indices is None else list(indices)
    if limit is not None:
        if int(limit) < 1:
            raise FcnsegError(f"the image limit must be at least 1, got {limit}")
        chosen = chosen[:int(limit)]
    if not chosen:
        raise FcnsegError("no labelled images to measure mean IU on")
    return chosen


def _mean_iou(model: Any, dataset, indices: list[int], *, dtype: str | torch.dtype | None, optimize_model: bool,
              batch_size: int, workers: int) -> float:
    from ..weights.runtimes import OnnxRuntimeModel, OnnxRuntimeModule, OpenVinoModel

    if isinstance(model, (OnnxRuntimeModel, OpenVinoModel)):  # evaluation calls .eval() on its model
        model, optimize_model = OnnxRuntimeModule(model), False
    elif not isinstance(model, nn.Module):
        raise FcnsegError(f"cannot score a {type(model).__name__}: pass a PyTorch model, an OnnxRuntimeModel or "
                          f"an OpenVinoModel")
    ignore = getattr(dataset, "ignore_index", 255)
    cm = evaluate_model(model, dataset, indices=indices, num_classes=model.num_classes, ignore_index=ignore,
                        dtype=dtype, optimize_model=optimize_model, batch_size=batch_size, workers=workers)
    return float(cm.compute()["mean_iou"])


def miou_change(reference: Any, candidate: Any, dataset, *, indices: Sequence[int] | None = None,
                limit: int | None = None, candidate_dtype: str | torch.dtype | None = None,
                candidate_ready: bool = False, reference_miou: float | None = None, batch_size: int = 8,
                workers: int = 0) -> MiouChange:
    """Mean IU of ``reference`` (run in float32) and of ``candidate`` on the same images of ``dataset``
    (``(image, mask)`` items normalised as the models expect; ``indices``, then the first ``limit``).

    ``candidate`` is a PyTorch model, run as ``optimize(candidate, candidate_dtype)`` makes it, or as it
    is with ``candidate_ready`` (a model ``optimize`` already converted, e.g. with ``keep_float32``), or
    an ``OnnxRuntimeModel`` (an int8 export) or ``OpenVinoModel`` (e.g. in bf16 precision), run as opened. Neither model is changed.
    ``reference_miou`` skips scoring the reference again when it is already known on these images.
    """
    chosen = _indices(dataset, indices, limit)
    if reference_miou is None:
        reference_miou = _mean_iou(reference, dataset, chosen, dtype=None, optimize_model=True,
                                   batch_size=batch_size, workers=workers)
    got = _mean_iou(candidate, dataset, chosen, dtype=candidate_dtype, optimize_model=not candidate_ready,
                    batch_size=batch_size, workers=workers)
    return MiouChange(float(reference_miou), got, len(chosen))


# ---------------------------------------------------------------------------------------------------
# per-layer sensitivity

def _is_float_head(name: str) -> bool:
    # the FCN parts that run in float32 in every precision (optimize's and quantize_onnx's heads)
    return name.split(".")[0] in FCN_FLOAT32_PARTS


def sensitivity_units(model: nn.Module, precision: str = "bfloat16", depth: int = 0) -> list[str]:
    """Names of the parts ``layer_sensitivity`` converts one at a time: every convolution outside the
    float32 head (int8: every ``nn.Conv2d``, the layers ONNX Runtime quantizes), or with ``depth`` > 0
    those names cut to their first ``depth`` components (blocks), in the model's order."""
    kinds = (nn.Conv2d,) if precision == "int8" else (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    units: list[str] = []
    for name, m in model.named_modules():
        if not name or _is_float_head(name) or not isinstance(m, kinds):
            continue
        unit = ".".join(name.split(".")[:depth]) if depth > 0 else name
        if unit not in units:
            units.append(unit)
    return units


class _CastOutput:
    """A forward hook that hands a 16-bit layer's floating output on as float32, so that only this
    layer's own arithmetic is rounded."""

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, dict):  # a backbone's features keyed by stride
            return {k: self(module, args, v) for k, v in out.items()}
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def _one_part_in(base: nn.Module, name: str, dtype: torch.dtype) -> nn.Module:
    """A copy of the float32 model ``base`` whose part ``name`` alone computes in ``dtype``."""
    net = copy_model(base)
    part = net.get_submodule(name).to(dtype)
    part.register_forward_pre_hook(CastInputs(dtype, False))
    part.register_forward_hook(_CastOutput())
    return net


def _checked_units(model: nn.Module, units: Sequence[str]) -> list[str]:
    """``units`` as a list, each the name of one of ``model``'s layers; a one-line error otherwise."""
    if not units:
        raise FcnsegError("the model has no layers to convert outside its float32 head")
    for name in units:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FcnsegError(f"the model has no layer named {name!r}") from None
    return list(units)


def layer_sensitivity(model: nn.Module, dataset, precision: str = "bfloat16", *, units: Sequence[str] | None = None,
                      depth: int = 0, indices: Sequence[int] | None = None, limit: int | None = None,
                      calibration: Iterable[np.ndarray] | None = None, batch_size: int = 8, workers: int = 0,
                      on_unit: Callable[[dict[str, Any]], None] | None = None,
                      backend: str = "onnxruntime") -> list[dict[str, Any]]:
    """How much mean IU each part costs when it alone runs in ``precision``, worst first.

    Rows ``{"layer", "miou", "drop_points", "reference_miou", "images"}`` (mean IU as a fraction; the drop
    in points against the float32 model's ``reference_miou`` on the same images). ``units``: names of the parts to try (default
    ``sensitivity_units(model, precision, depth)``). bfloat16: the part's weights and arithmetic in
    bfloat16, the rest of the (batch-norm-folded) model float32. int8: the model exported to ONNX
    once, then quantized by ``fcnseg.weights.export.quantize_onnx`` with ``only=`` that part (activation ranges
    from ``calibration``, required) and run by ``backend`` ("onnxruntime" or "openvino", the runtime the int8 model
    will run in: their int8 kernels round differently). ``on_unit`` sees each row as it is measured
    (a long run can show progress). The worst parts are the ones to keep float32
    (``optimize(..., keep_float32=...)``; ``fcnseg export --int8-layers`` quantizes only the others).
    """
    if precision not in PRECISIONS:
        raise FcnsegError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    units = _checked_units(model, units if units is not None else sensitivity_units(model, precision, depth))
    chosen = _indices(dataset, indices, limit)
    base = optimize(model, None)  # batch norm folded: what every candidate starts from
    reference = _mean_iou(base, dataset, chosen, dtype=None, optimize_model=False, batch_size=batch_size,
                          workers=workers)
    rows = []

    def measure(name: str, candidate: Any, ready: bool) -> None:
        change = miou_change(base, candidate, dataset, indices=chosen, candidate_ready=ready,
                             reference_miou=reference, batch_size=batch_size, workers=workers)
        row = {"layer": name, "miou": change.candidate, "drop_points": change.drop_points,
               "reference_miou": reference, "images": len(chosen)}
        rows.append(row)
        if on_unit is not None:
            on_unit(row)

    if precision == "bfloat16":
        for name in units:
            measure(name, _one_part_in(base, name, torch.bfloat16), True)
    else:
        from ..weights.checkpoint import open_model
        from ..weights.export import export_onnx, quantize_onnx

        if backend not in ("onnxruntime", "openvino"):
            raise FcnsegError(f"unknown int8 backend {backend!r}; valid: onnxruntime, openvino")
        batches = list(calibration or [])
        if not batches:
            raise FcnsegError("int8 sensitivity needs calibration images for the activation ranges")
        size = tuple(batches[0].shape[-2:])
        with tempfile.TemporaryDirectory(prefix="fcnseg-sensitivity-") as tmp:
            fp32 = export_onnx(model, Path(tmp) / "float32.onnx", example_size=size)
            for i, name in enumerate(units):
                path = quantize_onnx(fp32, Path(tmp) / f"{i}.onnx", batches, only=(name + ".",))
                measure(name, open_model(path, backend=backend), True)
    return sorted(rows, key=lambda r: -r["drop_points"] if not math.isnan(r["drop_points"]) else -math.inf)


def format_sensitivity(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``layer_sensitivity`` rows, worst first."""
    width = max(5, *(len(r["layer"]) for r in rows))
    head = f"{'layer':<{width}} {'mean IU':>8} {'change':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['layer']:<{width}} {100 * r['miou']:>8.2f} {-r['drop_points']:>+8.2f}")
    return "\n".join(out)
