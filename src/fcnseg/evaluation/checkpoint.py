"""Evaluation as a library call: ``evaluate_checkpoint`` scores a checkpoint the way ``fcnseg evaluate`` does."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import FcnsegError
from .metrics import absent_classes

log = logging.getLogger(__name__)


def run_defaults(checkpoint: str | Path) -> dict[str, Any]:
    """dataset, root, val split and dataset_kwargs from a run directory's config.yaml (empty for other checkpoints)."""
    path = Path(checkpoint)
    cfg_file = path / "config.yaml" if path.is_dir() else path.parent.parent / "config.yaml"
    if not cfg_file.is_file() or not (path.is_dir() or path.parent.name == "checkpoints"):
        return {}
    from ..config import load_config

    cfg = load_config(cfg_file)
    out = {"dataset": cfg.dataset, "root": cfg.root or None, "dataset_kwargs": dict(cfg.dataset_kwargs)}
    if cfg.val_split:
        out["split"] = cfg.val_split
    return out


def evaluate_checkpoint(checkpoint: str | Path, dataset: str | None = None, root: str | Path | None = None,
                        split: str | None = None, *, flip: bool = False, scales: Sequence[float] = (1.0,),
                        exclude: Sequence[str | int] = (), exclude_absent: bool = False, limit: int = 0,
                        batch_size: int = 8, workers: int = 2, device: str | torch.device = "auto",
                        dtype: str = "float32", onnx_threads: int | None = None, backend: str | None = None,
                        dataset_kwargs: dict | None = None,
                        dense: str | None = None, dense_stride: int | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Score ``checkpoint`` (a built-in name, .safetensors file, run directory or exported .onnx file) on a
    dataset split at the images' original resolution, with the checkpoint's own normalisation, run as
    ``predict`` runs it (an optimized copy; images of equal size batched; ``dtype`` bfloat16 keeps the
    scoring layers in float32).

    ``dataset``, ``root``, ``split`` and the dataset arguments default to the run's config.yaml when
    ``checkpoint`` is a run directory (or a checkpoint inside one); ``split`` otherwise defaults to val.
    ``flip``/``scales`` add test-time augmentation; ``exclude`` (names or indices) and ``exclude_absent``
    leave classes out of the class-averaged means. ``dense`` ("shift-and-stitch" or "rarefaction") scores the
    net densely at ``dense_stride`` (default 8) instead of upsampling its coarse scores (``models.dense``).
    ``backend`` runs an exported .onnx checkpoint: "onnxruntime" (the default, float32) or "openvino" (float32, or
    with ``dtype`` bfloat16 its bf16 inference precision).
    Returns the scores (fractions in [0, 1]) with the confusion matrix, per-class rows and what was scored.
    """
    from ..data import build_dataset
    from .loop import evaluate_model
    from ..inference.options import check_scales

    dataset, root, split, dataset_kwargs = _what_to_score(checkpoint, dataset, root, split, dataset_kwargs)
    scales = check_scales(scales)
    if limit < 0:
        raise FcnsegError(f"limit must be 0 (all) or more, got {limit}")
    onnx = str(checkpoint).endswith(".onnx")
    heads = _check_options(checkpoint, onnx, dense=dense, dense_stride=dense_stride, plain=not (
        flip or tuple(scales) != (1.0,) or exclude or exclude_absent))
    if heads is not None and dataset == "siftflow" and "labels" not in dataset_kwargs:
        dataset_kwargs = dict(dataset_kwargs, labels="both")  # the only layout with one map per head
    # the data is checked before the model loads: a wrong root or split fails in a second
    data = build_dataset(dataset, root, split, **dataset_kwargs)
    model, device, dtype = _open_for_scoring(checkpoint, data, dataset, onnx=onnx, heads=heads, backend=backend,
                                             device=device, threads=onnx_threads, dtype=dtype, dense=dense,
                                             dense_stride=dense_stride)
    if heads is not None:
        return _evaluate_heads(checkpoint, model, data, dataset, root, split, limit=limit, workers=workers,
                               device=device, dtype=dtype)
    record = model.record
    _check_classes(checkpoint, model, data, dataset)
    classes = list(data.classes)
    excluded = class_indices(exclude, classes, dataset)
    n = min(limit, len(data)) if limit else len(data)
    # the freshly loaded model is ours: optimized in place (an ONNX model runs as exported)
    cm = evaluate_model(model, data, indices=list(range(n)), num_classes=model.num_classes,
                        ignore_index=data.ignore_index, device=device, dtype=dtype, optimize_model=not onnx,
                        inplace=True, batch_size=batch_size, workers=workers, flip=flip, scales=scales,
                        desc=f"{dataset} {split}", progress=progress)
    if exclude_absent:
        excluded += [i for i in absent_classes(cm) if i not in excluded]
    scores = cm.compute(exclude=excluded, class_names=classes)
    return {**_what_was_scored(checkpoint, record, data, dataset, root, split, n), "tta": {
        "flip": bool(flip), "scales": list(scales)}, "excluded": [classes[i] for i in sorted(excluded)],
            **({"dense": record["dense"]} if "dense" in record else {}),
            **({"labels": data.label_source} if hasattr(data, "label_source") else {}), **scores}


def _check_classes(checkpoint: str | Path, model, data, dataset: str) -> None:
    """The model must predict the dataset's classes; names that differ are only a warning (scored by index)."""
    if data.num_classes != model.num_classes:
        raise FcnsegError(f"{checkpoint} predicts {model.num_classes} classes but {dataset} has {data.num_classes}; "
                          f"evaluate on the dataset it was trained for")
    if list(model.record.get("classes", data.classes)) != list(data.classes):
        log.warning("the checkpoint's class names differ from %s's; scoring by index", dataset)


def _what_was_scored(checkpoint: str | Path, record, data, dataset: str, root: str | Path, split: str,
                     n: int) -> dict[str, Any]:
    """The head of a scores dictionary: the checkpoint, its architecture and the data scored."""
    return {"checkpoint": str(checkpoint), "arch": record.get("arch"), "dataset": dataset, "root": str(root),
            "split": split, "split_source": getattr(data, "split_source", None), "images": n}


def _what_to_score(checkpoint: str | Path, dataset: str | None, root: str | Path | None, split: str | None,
                   dataset_kwargs: dict | None) -> tuple[str, str | Path, str, dict]:
    """The dataset, root, split and dataset arguments: as given, else from a run directory's config.yaml (the
    dataset arguments only when it names the same dataset), the split else val."""
    defaults = run_defaults(checkpoint)
    dataset = dataset or defaults.get("dataset")
    root = root or defaults.get("root")
    split = split or defaults.get("split", "val")
    if dataset_kwargs is None:
        dataset_kwargs = defaults.get("dataset_kwargs", {}) if dataset == defaults.get("dataset") else {}
    if not dataset or not root:
        missing = "dataset" if not dataset else "root"
        raise FcnsegError(f"{checkpoint}: give the {missing} to score on (--{missing}); only a training run "
                          f"directory carries its own in config.yaml")
    return dataset, root, split, dataset_kwargs


def _check_options(checkpoint: str | Path, onnx: bool, *, dense: str | None, dense_stride: int | None,
                   plain: bool) -> dict | None:
    """Refuse options that do not go together, before any data or weights load; the checkpoint's heads (None for
    a one-head net or an .onnx file). ``plain``: no test-time augmentation and no excluded classes."""
    from ..weights.checkpoint import checkpoint_heads

    if dense is None and dense_stride is not None:
        raise FcnsegError("dense_stride needs dense='shift-and-stitch' or 'rarefaction'")
    if dense is not None and onnx:
        raise FcnsegError("dense scoring needs a PyTorch checkpoint; an exported .onnx model has its upsampling "
                          "built in")
    heads = None if onnx else checkpoint_heads(checkpoint)
    if heads is not None and (dense is not None or not plain):
        raise FcnsegError(f"{checkpoint}: a multi-head checkpoint ({', '.join(heads)}) is scored plainly: "
                          f"no dense scoring, test-time augmentation or excluded classes")
    return heads


def _open_for_scoring(checkpoint: str | Path, data, dataset: str, *, onnx: bool, heads: dict | None,
                      backend: str | None, device: str | torch.device, threads: int | None, dtype: str,
                      dense: str | None, dense_stride: int | None) -> tuple[torch.nn.Module, torch.device, str]:
    """The model as evaluation runs it (an ONNX Runtime or OpenVINO model wrapped as an ``nn.Module``, float32 in
    and out; densified for ``dense``), its device and compute dtype; sets ``data``'s transforms to the checkpoint's
    own normalisation at original resolution."""
    from ..weights.checkpoint import open_model
    from ..weights.runtimes import OnnxRuntimeModule
    from ..record import PairedTransform, normalization_of
    from ..hardware import pick_device

    device = torch.device("cpu") if onnx else pick_device(str(device))
    # checks the pairing; a runtime opens in its compute type (OpenVINO bfloat16: bf16 inference precision)
    model = open_model(checkpoint, backend=backend, device=device, threads=threads, dtype=dtype)
    if not isinstance(model, torch.nn.Module):  # ONNX Runtime, OpenVINO: in the nn.Module form evaluation expects
        model, dtype = OnnxRuntimeModule(model), "float32"  # float32 in and out: the runtime's own precision inside
    if dense is not None:
        from ..models.dense import densify

        model = densify(model, dense, dense_stride or 8)
    # the weights' own preprocessing (``CheckpointRecord.transforms()``), at original resolution
    data.transforms = PairedTransform([], None, *normalization_of(model))
    if heads is None and hasattr(model, "head_classes"):
        raise FcnsegError(f"{checkpoint}: a multi-head net whose record lists no heads (its 'heads' field); "
                          f"save it from a training run, which records every head's classes")
    return model, device, dtype


def _evaluate_heads(checkpoint: str | Path, model: torch.nn.Module, data, dataset: str, root: str | Path, split: str,
                    *, limit: int, workers: int, device: torch.device, dtype: str) -> dict[str, Any]:
    """A multi-head net's scores: one confusion matrix per head, over a dataset that yields one label map per
    head (``dataset.heads``, same names and class counts). The first head's scores are also the top-level
    ones; ``heads`` holds every head's, each with its ``label_source`` (e.g. derived geometric labels)."""
    from ..data.loader import Seeded, make_loader
    from .loop import evaluate

    record = model.record
    want = {name: len(h["classes"]) for name, h in record.heads.items()}
    data_heads = getattr(data, "heads", None)
    have = {name: len(h["classes"]) for name, h in data_heads.items()} if data_heads else None
    if have != want or list(have) != list(want):
        gives = f"label maps {have}" if have else f"one label map ({data.num_classes} classes)"
        raise FcnsegError(f"{checkpoint} has heads {want} but {dataset} {split} gives {gives}; score it on data "
                          f"with one label map per head (siftflow: labels='both')")
    n = min(limit, len(data)) if limit else len(data)
    loader = make_loader(Seeded(data, list(range(n))), list(range(n)), 1, workers, device)
    amp = torch.bfloat16 if dtype == "bfloat16" else None
    cms = evaluate(model, loader, device=device, ignore_index=data.ignore_index, amp_dtype=amp, progress=False)
    heads = {name: dict(cm.compute(class_names=data_heads[name]["classes"]),
                        label_source=data_heads[name].get("label_source")) for name, cm in cms.items()}
    first = next(iter(heads.values()))
    return {**_what_was_scored(checkpoint, record, data, dataset, root, split, n),
            "tta": {"flip": False, "scales": [1.0]}, "excluded": [],
            "labels": {name: h["label_source"] for name, h in heads.items()}, **first, "heads": heads}


def class_indices(names: Sequence[str | int], classes: list[str], dataset: str) -> list[int]:
    """Indices of classes given by name or index; anything else is a one-line error listing the classes."""
    out = []
    for c in map(str, names):
        if c in classes:
            out.append(classes.index(c))
        elif c.isdigit() and int(c) < len(classes):
            out.append(int(c))
        else:
            raise FcnsegError(f"exclude {c!r}: not a class of {dataset} ({', '.join(classes)})")
    return out
