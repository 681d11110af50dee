"""``fcnseg models``: the registered architectures and the built-in trained checkpoints."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list architectures (with parameter counts) and built-in checkpoints",
                       description="List the registered architectures (parameters, output stride) and the built-in "
                                   "trained checkpoints with their validation mean IU in percent; use a name with "
                                   "'fcnseg train --model NAME' or '--checkpoint NAME'.")
    p.add_argument("--num-classes", type=int, default=21, help="classes used to count parameters (default 21)")
    return p


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> int:
    import torch

    from ..weights.checkpoint import builtin_checkpoints, read_record
    from ..registry import build_model, list_models

    width = max(28, *(len(n) for n in list_models()))  # the longest name sets the column
    print(f"{'architecture':<{width}} {'parameters':>14} {'output stride':>14}")
    for name in list_models():
        with torch.device("meta"), torch.no_grad():  # shapes only: counting needs no memory and no initialisation
            model = build_model(name, num_classes=args.num_classes)
        print(f"{name:<{width}} {count_parameters(model):>14,} {model.output_stride:>14}")
    ckpts = builtin_checkpoints()
    print()
    if not ckpts:
        print("built-in checkpoints: none installed")
    for name, path in ckpts.items():
        rec = read_record(path)
        miou = rec.get("metrics", {}).get("mean_iou")
        extra = f"  val mIoU {100 * miou:.1f}" if isinstance(miou, (int, float)) else ""
        print(f"checkpoint {name:<12} {rec['arch']:<{width}} {rec['num_classes']:>3} classes{extra}")
    return 0
