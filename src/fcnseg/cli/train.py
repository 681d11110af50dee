"""``fcnseg train``: parse flags into a TrainConfig (defaults < --config YAML < flags) and call ``fcnseg.train.fit``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import AMP_DTYPES, ON_NONFINITE, OPTIMIZERS, REDUCTIONS, SCHEDULES
from . import hold_output

# flag -> (config key, argparse keywords); every flag defaults to None so only given flags override
FLAGS: dict[str, tuple[str, dict]] = {
    "--model": ("model", dict(help="architecture (see 'fcnseg models')")),
    "--pretrained": ("pretrained", dict(action=argparse.BooleanOptionalAction, help="ImageNet-initialised backbone")),
    "--init-from": ("init_from", dict(metavar="CHECKPOINT", help="staged training: start from this checkpoint's "
                                                                  "shared weights (FCN-32s -> 16s -> 8s)")),
    "--dataset": ("dataset", dict(help="dataset family: camvid, siftflow, voc, folder, ...")),
    "--root": ("root", dict(metavar="DIR", help="dataset folder")),
    "--split": ("split", dict(help="training split (default train)")),
    "--val-split": ("val_split", dict(help="validation split (default val; 'none' for no validation)")),
    "--crop-size": ("crop_size", dict(type=int, nargs=2, metavar=("H", "W"), help="random training crop")),
    "--scale-range": ("scale_range", dict(type=float, nargs=2, metavar=("LO", "HI"), help="random rescaling")),
    "--skip-bad": ("skip_bad", dict(action=argparse.BooleanOptionalAction,
                                    help="check every sample first and leave out bad ones (counted in "
                                         "metrics.jsonl, each named once)")),
    "--workers": ("workers", dict(type=int, help="data loading processes")),
    "--epochs": ("epochs", dict(type=int, help="passes over the training split (also sets the schedule length)")),
    "--batch-size": ("batch_size", dict(type=int, help="images per step per process")),
    "--accumulate": ("accumulate", dict(type=int, help="micro-batches per optimiser step")),
    "--optimizer": ("optimizer", dict(choices=OPTIMIZERS, help="sgd (the paper's, with --momentum) or adam")),
    "--lr": ("lr", dict(type=float, help="base learning rate")),
    "--momentum": ("momentum", dict(type=float, help="SGD momentum (ignored by adam)")),
    "--weight-decay": ("weight_decay", dict(type=float, help="L2 penalty on the weights")),
    "--schedule": ("schedule", dict(choices=SCHEDULES, help="how the learning rate changes over the run after the warm-up")),
    "--warmup-steps": ("warmup_steps", dict(type=int, metavar="N", help="raise the learning rate linearly to --lr over the first N optimiser steps (from warmup_factor x --lr)")),
    "--max-steps": ("max_steps", dict(type=int, help="stop after N optimiser steps (also the schedule length)")),
    "--time-budget-min": ("time_budget_min", dict(type=float, metavar="MIN", help="stop after MIN minutes")),
    "--loss-reduction": ("loss_reduction", dict(choices=REDUCTIONS, help="sum: the paper's unnormalised loss")),
    "--class-weights": ("class_weights", dict(metavar="FILE.json|median", help="per-class loss weights")),
    "--class-weight-power": ("class_weight_power", dict(type=float, metavar="P",
                                                        help="raise the class weights to P (0.5: softened balancing)")),
    "--loss-sample": ("loss_sample", dict(type=float, metavar="P", help="keep each output cell with probability P")),
    "--on-nonfinite": ("on_nonfinite", dict(choices=ON_NONFINITE, help="on a NaN/inf loss (default stop)")),
    "--amp": ("amp", dict(action=argparse.BooleanOptionalAction,
                           help="mixed precision (bf16 on CPU); without --amp/--no-amp: auto, bf16 only where this "
                                "CPU runs it natively and a timed probe finds it faster (the choice is in version.json)")),
    "--amp-dtype": ("amp_dtype", dict(choices=AMP_DTYPES, help="the 16-bit type of --amp (bfloat16 on CPUs)")),
    "--channels-last": ("channels_last", dict(action=argparse.BooleanOptionalAction, help="NHWC memory layout (often faster on CPUs)")),
    "--threads": ("threads", dict(type=int, help="torch CPU threads")),
    "--device": ("device", dict(help="auto, cpu, cuda, cuda:N")),
    "--seed": ("seed", dict(type=int, help="seed of initialisation, shuffling and augmentation (same seed: same run)")),
    "--eval-every": ("eval_every", dict(type=int, metavar="N", help="validate every N epochs")),
    "--val-limit": ("val_limit", dict(type=int, metavar="N", help="validate on the first N images only")),
    "--checkpoint-every-steps": ("checkpoint_every_steps", dict(type=int, metavar="N",
                                                                help="also save the resume state every N steps")),
    "--plots": ("plots", dict(action=argparse.BooleanOptionalAction, help="PNG curves, grids, confusion matrix")),
    "--progress": ("progress", dict(action=argparse.BooleanOptionalAction, help="progress bars; --no-progress: none")),
    "--out": ("out", dict(metavar="RUN_DIR", help="run directory")),
}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a model; a run directory keeps config, metrics, plots and checkpoints",
        description="Train a segmentation model. Settings come from the defaults, then --config FILE, then flags. "
                    "Multi-process: torchrun --nproc-per-node N -m fcnseg train ...")
    p.add_argument("--config", metavar="FILE", help="flat YAML file of TrainConfig keys (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest good state")
    for flag, (key, kw) in FLAGS.items():
        p.add_argument(flag, dest=key, default=None, **kw)
    p.add_argument("--ignore-value", type=int, default=None, metavar="V",
                   help="folder datasets: mask value V means 'not labelled' (sets dataset_kwargs.ignore_value)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key (YAML syntax for the value), e.g. --set bias_lr_mult=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--malloc", choices=("reuse", "system"), default="reuse",
                   help="reuse (default): glibc's malloc keeps freed memory for the next step instead of mapping "
                        "and unmapping large blocks each step (faster on CPUs; the process keeps its peak "
                        "memory); system: the C library's defaults")
    return p


def resolve_config(args: argparse.Namespace):
    """The TrainConfig these arguments describe (for a resume: the run's config.yaml, then flags)."""
    import yaml

    from ..config import TrainConfig, from_dict, load_config
    from ..errors import FcnsegError

    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise FcnsegError(f"{args.resume}: no config.yaml; is it a training run directory?")
        cfg = load_config(saved)
        if args.config:
            raise FcnsegError("--resume uses the run's own config.yaml; drop --config")
    else:
        cfg = load_config(args.config) if args.config else TrainConfig()
    given = {key: getattr(args, key) for _, (key, _) in FLAGS.items() if getattr(args, key) is not None}
    if given.get("val_split") in ("none", "None", ""):
        given["val_split"] = None
    cfg = from_dict(given, cfg, source="flag")
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise FcnsegError(f"--set expects KEY=VALUE, got {item!r}")
        cfg = from_dict({key: yaml.safe_load(value)}, cfg, source="--set")
    if getattr(args, "ignore_value", None) is not None:
        cfg.dataset_kwargs = {**cfg.dataset_kwargs, "ignore_value": args.ignore_value}
    if args.resume:
        cfg.out = str(args.resume)
    if not args.resume and not args.print_config:
        missing = [k for k in ("root",) if not getattr(cfg, k)]
        if missing:
            raise FcnsegError(f"missing --{missing[0]} (or '{missing[0]}:' in the --config file)")
    return cfg.validate()


def run(args: argparse.Namespace) -> int:
    from ..config import dump_config
    from ..train import fit

    cfg = resolve_config(args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    warn_untrained_vgg(cfg)
    hold_output(args, cfg.out, "--resume" if args.resume else "--out")  # one run writes a run directory
    if cfg.dataset == "folder" and not args.resume:
        from ..data.folder import split_source

        check_folder_root(Path(cfg.root))
        kw = {k: cfg.dataset_kwargs[k] for k in ("val_fraction", "seed") if k in cfg.dataset_kwargs}
        print(f"training on split {cfg.split!r}: {split_source(Path(cfg.root), cfg.split, **kw)}")
        if cfg.val_split:
            print(f"validating on split {cfg.val_split!r}: {split_source(Path(cfg.root), cfg.val_split, **kw)}")
    if args.malloc == "reuse":
        from ..hardware import reuse_freed_memory

        reuse_freed_memory()  # the process is the run's: a process-wide setting is the program's to make
    started = time.monotonic()
    summary = fit(cfg, resume=bool(args.resume), command=["fcnseg", *sys.argv[1:]])
    for warning in schedule_warnings(cfg, summary, time.monotonic() - started):
        print(f"fcnseg: warning: {warning}", file=sys.stderr)
    print(closing_note(Path(cfg.out), summary))
    return 0


def schedule_warnings(cfg, summary: dict, wall_s: float) -> list[str]:
    """What a new user would not notice at the end of a run: it stopped inside the learning-rate warm-up, or
    far short of its schedule, or well past its time budget (validation and start-up are not inside it)."""
    from ..train.optim import lr_factor

    step, total = summary.get("step", 0), summary.get("total_steps")
    out = []
    if step < cfg.warmup_steps:
        reached = lr_factor(max(step - 1, 0), total or step, cfg.schedule, cfg.warmup_steps, cfg.warmup_factor)
        out.append(f"the run ended after {step} optimiser steps, inside its {cfg.warmup_steps}-step learning-rate "
                   f"warm-up: the rate reached only {reached * cfg.lr:.2g} of --lr {cfg.lr:g}, so the model is barely "
                   f"trained; train longer (--epochs) or shorten --warmup-steps")
    elif total and step < total / 2:
        out.append(f"the run stopped after {step} of its {total} scheduled steps ({100 * step / total:.0f}%): its "
                   f"learning rate never came down as the schedule plans; give it the time, or fewer --epochs "
                   f"so that the schedule fits")
    budget_s = (cfg.time_budget_min or 0) * 60
    if budget_s and wall_s > 1.25 * budget_s + 10:
        out.append(f"the run took {wall_s:.0f} s against --time-budget-min {cfg.time_budget_min:g} "
                   f"({budget_s:.0f} s): the budget stops training steps, but start-up and the final validation "
                   f"come on top; --val-limit N validates on fewer images")
    return out


# the marks of a labelling tool's raw export (what 'fcnseg data import --from' reads)
def check_folder_root(root: Path) -> None:
    """``--dataset folder`` needs images/, masks/ and classes.txt; a raw labelme, COCO or CVAT export there is
    named as such with the 'fcnseg data import' command that converts it, before anything else is read."""
    from ..errors import FcnsegError, show_path

    if not root.is_dir() or (root / "images").is_dir() and (root / "masks").is_dir():
        return  # a missing root, or a folder dataset: the dataset reader says what is wrong with it
    found = _raw_export(root)
    if found is not None:
        fmt, src = found
        raise FcnsegError(f"--root {show_path(root)}: a {fmt} export, not a folder dataset (images/, masks/, "
                          f"classes.txt); convert it first: fcnseg data import {show_path(src)} --from {fmt} "
                          f"--out DATASET, then train with --root DATASET")
    if not (root / "images").is_dir():
        raise FcnsegError(f"--root {show_path(root)}: no images/ folder; a folder dataset holds images/, masks/ and "
                          f"classes.txt (fcnseg data import converts a labelme, COCO or CVAT export into one)")


def _raw_export(root: Path) -> tuple[str, Path] | None:
    """("labelme" | "coco" | "cvat", what to import) when ``root`` holds a tool's export, else None."""
    import json

    if (root / "annotations.xml").is_file():
        return "cvat", root / "annotations.xml"
    candidates = sorted(root.glob("*.json")) + sorted(root.glob("annotations/*.json"))
    for path in candidates[:50]:
        try:
            if path.stat().st_size > 64 * 2**20:  # a big JSON beside images: COCO, by far the likeliest
                return "coco", path
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(doc, dict) and "shapes" in doc:
            return "labelme", root
        if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
            return "coco", path
    return None


def warn_untrained_vgg(cfg) -> None:
    """One warning when a VGG-based net is to be trained from random weights (slow, poor on small data)."""
    import warnings

    if "vgg" in cfg.model and not cfg.pretrained and not cfg.init_from:
        warnings.warn(f"{cfg.model} from random weights: 134 M parameters to learn from scratch, slow on a CPU and "
                      f"poor on small datasets; add --pretrained (ImageNet weights) or use the default "
                      f"fcn8s_efficientnet_lite0", stacklevel=2)


def closing_note(out: Path, summary: dict) -> str:
    """The end of a run: the best checkpoint, its validation scores, and the commands to use it."""
    from ..weights.checkpoint import read_record

    ckpts = out / "checkpoints"
    best = ckpts / "best.safetensors"
    path = best if best.is_file() else ckpts / "last.safetensors"
    if not path.is_file():
        return f"run {out}: no checkpoint was written"
    metrics = read_record(path).get("metrics") or {k: summary[k] for k in ("mean_iou",) if k in summary}
    names = (("pixel_accuracy", "pixel acc."), ("mean_accuracy", "mean acc."), ("mean_iou", "mean IU"),
             ("fw_iou", "f.w. IU"))
    scores = ", ".join(f"{label} {100 * metrics[k]:.1f}" for k, label in names
                       if isinstance(metrics.get(k), (int, float)))
    which = "best" if path == best else "last"
    where = f" (epoch {metrics['epoch']}, split {metrics.get('split')})" if "epoch" in metrics else ""
    lines = [f"{which} checkpoint: {path}" + where, f"validation: {scores}" if scores else "validation: none run",
             "next:",
             f"  fcnseg evaluate --checkpoint {path}   # scores on the run's val split",
             f"  fcnseg predict --checkpoint {path} PHOTOS... --out masks/",
             f"  fcnseg export --checkpoint {path} --format onnx --out model.onnx"]
    return "\n".join(lines)
