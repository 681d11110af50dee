"""``fcnseg demo``: the main job on built-in defaults (for now: a summary of the model family)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="show the model family: parameters, output stride, output size at 500x500")
    p.add_argument("--size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"))
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..registry import build_model, list_models
    from .models import count_parameters

    torch.set_grad_enabled(False)
    h, w = args.size
    x = torch.zeros(1, 3, h, w)
    print(f"{'model':<28} {'parameters':>14} {'stride':>7} {'output for ' + f'{h}x{w}':>22}")
    for name in list_models():
        model = build_model(name, num_classes=21).eval()
        out = tuple(model(x).shape)
        print(f"{name:<28} {count_parameters(model):>14,} {model.output_stride:>7} {str(out):>22}")
    return 0
