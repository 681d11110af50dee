"""``fcnseg evaluate``: score a checkpoint on a dataset split at the images' original resolution."""
from __future__ import annotations

import argparse
import sys

from .predict import add_dense_arguments, dense_model


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="score a checkpoint: pixel acc., mean acc., mean IU, f.w. IU, per class",
                       description="Score a checkpoint on a dataset split (batch size 1, original resolution). "
                                   "Means leave out classes with no defined value (see fcnseg.metrics).")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a .safetensors checkpoint, a run directory, a built-in name, or an exported .onnx file "
                        "(run by ONNX Runtime on the CPU, e.g. to score an int8 model)")
    p.add_argument("--dataset", required=True, help="dataset family: camvid, siftflow, voc, folder, ...")
    p.add_argument("--root", required=True, metavar="DIR", help="dataset folder")
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--json", metavar="FILE", help="write the scores (fractions in [0, 1]) as JSON")
    p.add_argument("--confusion-png", metavar="FILE", help="write a row-normalised confusion-matrix plot")
    p.add_argument("--exclude", nargs="+", default=[], metavar="CLASS",
                   help="leave these classes (names or indices) out of the class-averaged means")
    p.add_argument("--exclude-absent", action="store_true",
                   help="leave out classes with no pixel in this split (the paper's SIFT Flow protocol)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="score the first N images only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test-time augmentation: average over the image rescaled by each S (e.g. 1 1.5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    add_dense_arguments(p)  # --dense shift-and-stitch|rarefaction, --dense-stride (see cli/predict.py)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint
    from ..data import build_dataset, build_transforms
    from ..engine import evaluate
    from ..errors import FcnsegError
    from ..inference import TestTimeAugmentation, check_scales
    from ..metrics import absent_classes, format_table
    from ..train.distributed import pick_device
    from ..train.loader import Seeded, make_loader
    from ..train.report import plot_confusion, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.checkpoint).endswith(".onnx"):
        from ..export import OnnxRuntimeModel, OnnxRuntimeModule

        device = torch.device("cpu")
        model = OnnxRuntimeModule(OnnxRuntimeModel(args.checkpoint, threads=args.threads or None))
        if args.amp:
            raise FcnsegError("--amp is for PyTorch checkpoints; an ONNX model runs in its own precision")
    else:
        device = pick_device(args.device)
        model = load_checkpoint(args.checkpoint, device=device)
    model = dense_model(args, lambda: model) or model
    record = model.record
    dataset = build_dataset(args.dataset, args.root, args.split)
    norm = record.get("normalization", {})
    if "mean" in norm and "std" in norm:  # the checkpoint's own preprocessing, at original resolution
        dataset.transforms = build_transforms(getattr(dataset, "preset", args.dataset), train=False,
                                              mean=norm["mean"], std=norm["std"])
    if dataset.num_classes != model.num_classes:
        raise FcnsegError(f"{args.checkpoint} predicts {model.num_classes} classes but {args.dataset} has "
                          f"{dataset.num_classes}; evaluate on the dataset it was trained for")
    if list(record.get("classes", dataset.classes)) != list(dataset.classes):
        print(f"fcnseg: warning: the checkpoint's class names differ from {args.dataset}'s; scoring by index",
              file=sys.stderr)
    classes = list(dataset.classes)
    exclude = []
    for c in args.exclude:
        if c in classes:
            exclude.append(classes.index(c))
        elif c.isdigit() and int(c) < len(classes):
            exclude.append(int(c))
        else:
            raise FcnsegError(f"--exclude {c!r}: not a class of {args.dataset} ({', '.join(classes)})")
    scales = check_scales(args.scales)
    tta = {"flip": args.flip, "scales": list(scales)}
    net = model if scales == (1.0,) and not args.flip else TestTimeAugmentation(model, scales, args.flip)
    n = min(args.limit, len(dataset)) if args.limit else len(dataset)
    loader = make_loader(Seeded(dataset), list(range(n)), 1, args.workers, device)
    cm = evaluate(net, loader, model.num_classes, device=device, ignore_index=dataset.ignore_index,
                  amp_dtype=torch.bfloat16 if args.amp else None, desc=f"{args.dataset} {args.split}",
                  progress=sys.stderr.isatty() if args.progress is None else args.progress)
    if args.exclude_absent:
        exclude += [i for i in absent_classes(cm) if i not in exclude]
    scores = cm.compute(exclude=exclude, class_names=classes)
    scores = {"checkpoint": str(args.checkpoint), "arch": record.get("arch"), "dataset": args.dataset,
              "split": args.split, "images": n, "tta": tta,
              "excluded": [classes[i] for i in sorted(exclude)],
              **({"dense": record["dense"]} if "dense" in record else {}),
              **({"labels": dataset.label_source} if hasattr(dataset, "label_source") else {}), **scores}
    aug = "" if net is model else f", test-time flip={args.flip} scales={tta['scales']}"
    print(f"{record.get('arch')} on {args.dataset} {args.split} ({n} images{aug})")
    print(format_table(scores))
    if args.json:
        write_json(args.json, scores)
    if args.confusion_png:
        plot_confusion(scores["confusion_matrix"], classes, args.confusion_png,
                       title=f"{record.get('arch')} on {args.dataset} {args.split}")
    return 0
