"""``fcnseg models``: the registered architectures and the built-in trained checkpoints."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list architectures (with parameter counts) and built-in checkpoints")
    p.add_argument("--num-classes", type=int, default=21, help="classes used to count parameters (default 21)")
    return p


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> int:
    import torch

    from ..weights.checkpoint import builtin_checkpoints, read_record
    from ..registry import build_model, list_models

    print(f"{'architecture':<28} {'parameters':>14} {'output stride':>14}")
    for name in list_models():
        with torch.device("meta"), torch.no_grad():  # shapes only: counting needs no memory and no initialisation
            model = build_model(name, num_classes=args.num_classes)
        print(f"{name:<28} {count_parameters(model):>14,} {model.output_stride:>14}")
    ckpts = builtin_checkpoints()
    print()
    if not ckpts:
        print("built-in checkpoints: none installed")
    for name, path in ckpts.items():
        rec = read_record(path)
        miou = rec.get("metrics", {}).get("mean_iou")
        extra = f"  val mIoU {miou:.3f}" if isinstance(miou, float) else ""
        print(f"checkpoint {name:<12} {rec['arch']:<28} {rec['num_classes']:>3} classes{extra}")
    return 0
