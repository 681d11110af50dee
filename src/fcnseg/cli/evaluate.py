"""``fcnseg evaluate``: score a checkpoint on a dataset split at the images' original resolution."""
from __future__ import annotations

import argparse
import sys

from .predict import add_dense_arguments


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="score a checkpoint: pixel acc., mean acc., mean IU, f.w. IU, per class",
                       description="Score a checkpoint on a dataset split at original resolution, running the model "
                                   "as predict does (optimized; images of equal size batched). "
                                   "Means leave out classes with no defined value (see fcnseg.evaluation.metrics).")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a .safetensors checkpoint, a run directory, a built-in name, or an exported .onnx file "
                        "(run by ONNX Runtime on the CPU, e.g. to score an int8 model; or by OpenVINO: --backend)")
    p.add_argument("--backend", choices=("onnxruntime", "openvino"), default=None,
                   help="the runtime of an exported .onnx checkpoint (default onnxruntime)")
    p.add_argument("--dataset", help="dataset family: camvid, siftflow, voc, folder, ... (default: the run's)")
    p.add_argument("--root", metavar="DIR", help="dataset folder (default: the run's, for a run directory)")
    p.add_argument("--split", default=None, help="split to score (default: the run's val split, else val)")
    p.add_argument("--json", metavar="FILE", help="write the scores (fractions in [0, 1]) as JSON")
    p.add_argument("--confusion-png", metavar="FILE",
                   help="write a row-normalised confusion-matrix plot (a multi-head net: its first head's)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="CLASS",
                   help="leave these classes (names or indices) out of the class-averaged means")
    p.add_argument("--exclude-absent", action="store_true",
                   help="leave out classes with no pixel in this split (the paper's SIFT Flow protocol)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="score the first N images only")
    p.add_argument("--workers", type=int, default=2, help="loader processes preparing the next batches (default 2)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="images of equal size scored together (default 8; the scores do not depend on it)")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test-time augmentation: average over the image rescaled by each S (e.g. 1 1.5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations (bfloat16 keeps the FCN's scoring layers in float32; with "
                        "--backend openvino: its bf16 inference precision)")
    p.add_argument("--amp", action="store_true", help="the same as --dtype bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal); --no-progress: none")
    add_dense_arguments(p)  # --dense shift-and-stitch|rarefaction, --dense-stride (see cli/predict.py)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.checkpoint import evaluate_checkpoint
    from ..evaluation.metrics import format_table
    from ..files import output_file
    from ..train.report import plot_confusion, write_json

    from ..errors import FcnsegError, show_path

    from ..weights.checkpoint import check_checkpoint_name

    if args.dense is None and args.dense_stride is not None:  # named as the flags are
        raise FcnsegError("--dense-stride needs --dense shift-and-stitch or --dense rarefaction")
    # before the model loads: a bad --json place must not cost a whole evaluation
    if args.json:
        output_file(args.json, what="--json")
    if args.confusion_png:
        output_file(args.confusion_png, what="--confusion-png")
    check_checkpoint_name(args.checkpoint)  # a typo is named as such, before the dataset flags are asked for
    if args.threads:
        torch.set_num_threads(args.threads)
    scores = evaluate_checkpoint(
        args.checkpoint, args.dataset, args.root, args.split, flip=args.flip, scales=args.scales,
        exclude=args.exclude, exclude_absent=args.exclude_absent, limit=args.limit, batch_size=args.batch_size,
        workers=args.workers, device=args.device, dtype="bfloat16" if args.amp else args.dtype,
        onnx_threads=args.threads or None, backend=args.backend, dense=args.dense, dense_stride=args.dense_stride,
        progress=sys.stderr.isatty() if args.progress is None else args.progress)
    tta = scores["tta"]
    aug = "" if tta == {"flip": False, "scales": [1.0]} else f", test-time flip={tta['flip']} scales={tta['scales']}"
    source = f", split from {scores['split_source']}" if scores.get("split_source") else ""
    what = f"{scores['dataset']} {scores['split']}"
    print(f"{scores['arch'] or show_path(args.checkpoint)} on {what} ({scores['images']} images{aug}{source})")
    if "heads" in scores:  # a multi-head net: one table per head, with where its labels came from
        for name, head in scores["heads"].items():
            print(f"\nhead {name} (labels: {head.get('label_source') or 'the dataset'})")
            print(format_table(head))
    else:
        print(format_table(scores))
    if args.json:
        write_json(args.json, scores)
    if args.confusion_png:
        plot_confusion(scores["confusion_matrix"], [r["name"] for r in scores["per_class"]], args.confusion_png,
                       title=f"{scores['arch'] or show_path(args.checkpoint)} on {what}")
    return 0
