"""``fcnseg train``: parse flags into a TrainConfig (defaults < --config YAML < flags) and call ``fcnseg.train.fit``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import AMP_DTYPES, ON_NONFINITE, OPTIMIZERS, REDUCTIONS, SCHEDULES

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
    "--epochs": ("epochs", dict(type=int)),
    "--batch-size": ("batch_size", dict(type=int, help="images per step per process")),
    "--accumulate": ("accumulate", dict(type=int, help="micro-batches per optimiser step")),
    "--optimizer": ("optimizer", dict(choices=OPTIMIZERS)),
    "--lr": ("lr", dict(type=float, help="base learning rate")),
    "--momentum": ("momentum", dict(type=float)),
    "--weight-decay": ("weight_decay", dict(type=float)),
    "--schedule": ("schedule", dict(choices=SCHEDULES)),
    "--warmup-steps": ("warmup_steps", dict(type=int)),
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
    "--amp-dtype": ("amp_dtype", dict(choices=AMP_DTYPES)),
    "--channels-last": ("channels_last", dict(action=argparse.BooleanOptionalAction)),
    "--threads": ("threads", dict(type=int, help="torch CPU threads")),
    "--device": ("device", dict(help="auto, cpu, cuda, cuda:N")),
    "--seed": ("seed", dict(type=int)),
    "--eval-every": ("eval_every", dict(type=int, metavar="N", help="validate every N epochs")),
    "--val-limit": ("val_limit", dict(type=int, metavar="N", help="validate on the first N images only")),
    "--checkpoint-every-steps": ("checkpoint_every_steps", dict(type=int, metavar="N",
                                                                help="also save the resume state every N steps")),
    "--plots": ("plots", dict(action=argparse.BooleanOptionalAction, help="PNG curves, grids, confusion matrix")),
    "--progress": ("progress", dict(action=argparse.BooleanOptionalAction, help="progress bars")),
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
    if cfg.dataset == "folder" and not args.resume:
        from ..data.folder import split_source

        kw = {k: cfg.dataset_kwargs[k] for k in ("val_fraction", "seed") if k in cfg.dataset_kwargs}
        print(f"training on split {cfg.split!r}: {split_source(Path(cfg.root), cfg.split, **kw)}")
        if cfg.val_split:
            print(f"validating on split {cfg.val_split!r}: {split_source(Path(cfg.root), cfg.val_split, **kw)}")
    if args.malloc == "reuse":
        from ..hardware import reuse_freed_memory

        reuse_freed_memory()  # the process is the run's: a process-wide setting is the program's to make
    summary = fit(cfg, resume=bool(args.resume), command=["fcnseg", *sys.argv[1:]])
    print(closing_note(Path(cfg.out), summary))
    return 0


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
