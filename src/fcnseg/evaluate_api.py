"""Evaluation as a library call: ``evaluate_checkpoint`` scores a checkpoint the way ``fcnseg evaluate`` does."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import FcnsegError

log = logging.getLogger(__name__)


def run_defaults(checkpoint: str | Path) -> dict[str, Any]:
    """dataset, root, val split and dataset_kwargs from a run directory's config.yaml (empty for other checkpoints)."""
    path = Path(checkpoint)
    cfg_file = path / "config.yaml" if path.is_dir() else path.parent.parent / "config.yaml"
    if not cfg_file.is_file() or not (path.is_dir() or path.parent.name == "checkpoints"):
        return {}
    from .config import load_config

    cfg = load_config(cfg_file)
    out = {"dataset": cfg.dataset, "root": cfg.root or None, "dataset_kwargs": dict(cfg.dataset_kwargs)}
    if cfg.val_split:
        out["split"] = cfg.val_split
    return out


def evaluate_checkpoint(checkpoint: str | Path, dataset: str | None = None, root: str | Path | None = None,
                        split: str | None = None, *, flip: bool = False, scales: Sequence[float] = (1.0,),
                        exclude: Sequence[str | int] = (), exclude_absent: bool = False, limit: int = 0,
                        workers: int = 0, device: str | torch.device = "auto", amp: bool = False,
                        onnx_threads: int | None = None, dataset_kwargs: dict | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Score ``checkpoint`` (a built-in name, .safetensors file, run directory or exported .onnx file) on a
    dataset split at the images' original resolution, with the checkpoint's own normalisation.

    ``dataset``, ``root``, ``split`` and the dataset arguments default to the run's config.yaml when
    ``checkpoint`` is a run directory (or a checkpoint inside one); ``split`` otherwise defaults to val.
    ``flip``/``scales`` add test-time augmentation; ``exclude`` (names or indices) and ``exclude_absent``
    leave classes out of the class-averaged means. Returns the scores (fractions in [0, 1]) with the
    confusion matrix, per-class rows and what was scored.
    """
    from .checkpoint import load_checkpoint
    from .data import build_dataset, build_transforms
    from .engine import evaluate
    from .inference import TestTimeAugmentation, check_scales
    from .metrics import absent_classes
    from .train.distributed import pick_device
    from .train.loader import Seeded, make_loader

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
    scales = check_scales(scales)
    if limit < 0:
        raise FcnsegError(f"limit must be 0 (all) or more, got {limit}")
    # the data is checked before the model loads: a wrong root or split fails in a second
    data = build_dataset(dataset, root, split, **dataset_kwargs)
    if str(checkpoint).endswith(".onnx"):
        from .export import OnnxRuntimeModel, OnnxRuntimeModule

        if amp:
            raise FcnsegError("amp is for PyTorch checkpoints; an ONNX model runs in its own precision")
        device = torch.device("cpu")
        model = OnnxRuntimeModule(OnnxRuntimeModel(checkpoint, threads=onnx_threads))
    else:
        device = pick_device(str(device))
        model = load_checkpoint(checkpoint, device=device)
    record = model.record
    norm = record.get("normalization", {})
    if "mean" in norm and "std" in norm:  # the checkpoint's own preprocessing, at original resolution
        data.transforms = build_transforms(getattr(data, "preset", dataset), train=False, mean=norm["mean"],
                                           std=norm["std"])
    if data.num_classes != model.num_classes:
        raise FcnsegError(f"{checkpoint} predicts {model.num_classes} classes but {dataset} has {data.num_classes}; "
                          f"evaluate on the dataset it was trained for")
    if list(record.get("classes", data.classes)) != list(data.classes):
        log.warning("the checkpoint's class names differ from %s's; scoring by index", dataset)
    classes = list(data.classes)
    excluded = []
    for c in exclude:
        c = str(c)
        if c in classes:
            excluded.append(classes.index(c))
        elif c.isdigit() and int(c) < len(classes):
            excluded.append(int(c))
        else:
            raise FcnsegError(f"exclude {c!r}: not a class of {dataset} ({', '.join(classes)})")
    net = model if scales == (1.0,) and not flip else TestTimeAugmentation(model, scales, flip)
    n = min(limit, len(data)) if limit else len(data)
    loader = make_loader(Seeded(data), list(range(n)), 1, workers, device)
    cm = evaluate(net, loader, model.num_classes, device=device, ignore_index=data.ignore_index,
                  amp_dtype=torch.bfloat16 if amp else None, desc=f"{dataset} {split}", progress=progress)
    if exclude_absent:
        excluded += [i for i in absent_classes(cm) if i not in excluded]
    scores = cm.compute(exclude=excluded, class_names=classes)
    return {"checkpoint": str(checkpoint), "arch": record.get("arch"), "dataset": dataset, "root": str(root),
            "split": split, "split_source": getattr(data, "split_source", None), "images": n,
            "tta": {"flip": bool(flip), "scales": list(scales)}, "excluded": [classes[i] for i in sorted(excluded)],
            **scores}
