"""``fcnseg export``: write a checkpoint as ONNX or TorchScript (dynamic height and width) and check parity."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript and check it against the model",
                       description="Export with dynamic batch, height and width, then run the exported file and the "
                                   "PyTorch model on the same random inputs at two sizes and print the largest "
                                   "absolute logit difference and the share of pixels whose class agrees. With "
                                   "--int8 --calibrate IMAGES, quantize the ONNX model to int8 for ONNX Runtime.")
    p.add_argument("--checkpoint", default="camvid", help="built-in name, .safetensors checkpoint or run directory")
    p.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), required=True)
    p.add_argument("--out", required=True, type=Path, help="output file (.onnx or .pt)")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"),
                   help="input size for tracing and the first parity check (default 360 480); the second check "
                        "uses an odd size to show the height and width are dynamic")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="fail (exit 1) if the largest absolute logit difference exceeds this (default 1e-3; "
                        "float exports only)")
    q = p.add_argument_group("int8 (ONNX only)", "Static int8 quantization for ONNX Runtime on CPUs: int8 weights, "
                             "uint8 activations calibrated on your images; the score and upsampling layers stay "
                             "float32. Parity is then measured on the calibration images themselves.")
    q.add_argument("--int8", action="store_true", help="quantize the exported ONNX model to int8")
    q.add_argument("--calibrate", nargs="+", default=[], metavar="INPUT",
                   help="images, folders or globs from the deployment's domain for the activation ranges "
                        "(resized to --size)")
    q.add_argument("--calibrate-limit", type=int, default=32, metavar="N",
                   help="use at most N calibration images, spread over the list (default 32)")
    q.add_argument("--int8-layers", nargs="+", default=[], metavar="PREFIX",
                   help="quantize only the convolutions whose weight names start with these, e.g. fc. for the "
                        "VGG nets' fc6 and fc7 (90%% of their weights); the rest stays float32")
    q.add_argument("--min-agreement", type=float, default=0.95, metavar="SHARE",
                   help="fail (exit 1) if fewer pixels than this share keep their class (default 0.95)")
    return p


def second_check_size(h: int, w: int) -> tuple[int, int]:
    """The size of the second parity check: about half the export size, shifted by 17 and 29 pixels so that
    it matches neither the export size nor its aspect ratio -- a graph with a size baked in fails there."""
    return h // 2 + 17, w // 2 + 29


def calibration_batches(patterns: list[str], size: tuple[int, int], model, limit: int) -> list:
    """Normalised (1, 3, H, W) float32 arrays of up to ``limit`` images spread over ``patterns``."""
    from ..data.io import read_image
    from ..errors import FcnsegError
    from ..export import calibration_batch
    from .predict import expand_inputs

    files, problems = expand_inputs(patterns)
    if problems:
        raise FcnsegError(problems[0])
    if limit < 1:
        raise FcnsegError(f"--calibrate-limit must be at least 1, got {limit}")
    if len(files) > limit:
        files = [files[round(i * (len(files) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else files[:1]
    from ..record import normalization_of

    mean, std = normalization_of(model)
    return [calibration_batch(read_image(f), size, mean, std) for f in files]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint
    from ..errors import FcnsegError
    from ..export import export, load_exported, parity
    from ..outputs import output_file
    from .predict import check_checkpoint_name

    output_file(args.out, what="--out")
    check_checkpoint_name(args.checkpoint)
    if args.int8 or args.calibrate or args.int8_layers:
        if args.fmt != "onnx":
            raise FcnsegError("--int8 quantizes ONNX models only; use --format onnx")
        if args.int8_layers and not args.int8:
            raise FcnsegError("--int8-layers chooses what --int8 quantizes; add --int8")
        if not (args.int8 and args.calibrate):
            raise FcnsegError("--int8 and --calibrate go together: int8 needs images to calibrate on")
    model = load_checkpoint(args.checkpoint)
    h, w = args.size
    if args.int8:
        return _export_int8(args, model, (h, w))
    path = export(model, args.out, args.fmt, example_size=(h, w))
    exported = load_exported(path)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in [(1, 3, h, w), (2, 3, *second_check_size(h, w))]:
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


def _export_int8(args: argparse.Namespace, model, size: tuple[int, int]) -> int:
    import tempfile

    import numpy as np
    import torch

    from ..errors import FcnsegError
    from ..export import OnnxRuntimeModel, export_onnx, parity, quantize_onnx

    batches = calibration_batches(args.calibrate, size, model, args.calibrate_limit)
    with tempfile.TemporaryDirectory(prefix="fcnseg-export-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "float32.onnx", example_size=size)
        path = quantize_onnx(fp32, args.out, batches, only=args.int8_layers)
    runtime = OnnxRuntimeModel(path)
    shown = batches[:4]
    odd = torch.nn.functional.interpolate(torch.from_numpy(batches[0]), size=second_check_size(*size), mode="bilinear",
                                          align_corners=False)
    worst = 1.0
    for x in [torch.from_numpy(np.concatenate(shown)), odd]:
        r = parity(model, runtime, x)
        worst = min(worst, r["class_agreement"])
        print(f"int8 parity on {x.shape[0]} calibration image(s) at {x.shape[2]}x{x.shape[3]}: max |logit difference| "
              f"{r['max_abs_logit_diff']:.3g}, class agreement {100 * r['class_agreement']:.2f}%")
    print(f"wrote {path} (onnx int8, calibrated on {len(batches)} image(s), {path.stat().st_size / 2**20:.1f} MB)")
    if worst < args.min_agreement:
        raise FcnsegError(f"{path}: only {100 * worst:.2f}% of pixels keep their class after int8 quantization, "
                          f"less than --min-agreement {args.min_agreement} (file kept for inspection)")
    return 0
