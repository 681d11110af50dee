"""``fcnseg export``: write a checkpoint as ONNX or TorchScript (dynamic height and width) and check parity."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript and check it against the model",
                       description="Export with dynamic batch, height and width, then run the exported file and the "
                                   "PyTorch model on the same random inputs at two sizes and print the largest "
                                   "absolute logit difference and the share of pixels whose class agrees.")
    p.add_argument("--checkpoint", default="camvid", help="built-in name, .safetensors checkpoint or run directory")
    p.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), required=True)
    p.add_argument("--out", required=True, type=Path, help="output file (.onnx or .pt)")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"),
                   help="input size for tracing and the first parity check (default 360 480); the second check "
                        "uses an odd size to show the height and width are dynamic")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="fail (exit 1) if the largest absolute logit difference exceeds this (default 1e-3)")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint
    from ..errors import FcnsegError
    from ..export import export, load_exported, parity
    from .predict import check_checkpoint_name

    check_checkpoint_name(args.checkpoint)
    model = load_checkpoint(args.checkpoint)
    h, w = args.size
    path = export(model, args.out, args.fmt, example_size=(h, w))
    exported = load_exported(path)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in [(1, 3, h, w), (2, 3, h // 2 + 17, w // 2 + 29)]:
        r = parity(model, exported, torch.randn(*shape, generator=gen))
        worst = max(worst, r["max_abs_logit_diff"])
        print(f"parity at {shape[2]}x{shape[3]} (batch {shape[0]}): max |logit difference| "
              f"{r['max_abs_logit_diff']:.3g}, class agreement {100 * r['class_agreement']:.3f}%")
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({args.fmt}, {size_mb:.1f} MB)")
    if worst > args.tolerance:
        raise FcnsegError(f"{path}: the exported model's logits differ by up to {worst:.3g}, more than "
                          f"--tolerance {args.tolerance} (file kept for inspection)")
    return 0
