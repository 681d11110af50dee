"""``fcnseg export``: write a checkpoint as ONNX or TorchScript (dynamic height and width) and check parity."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import hold_output


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript or a bfloat16 safetensors checkpoint, "
                                      "and check it against the model",
                       description="Export to ONNX or TorchScript with dynamic batch, height and width, then run the "
                                   "exported file and the "
                                   "PyTorch model on the same random inputs at two sizes and print the largest "
                                   "absolute logit difference and the share of pixels whose class agrees. With "
                                   "--int8 --calibrate IMAGES, quantize the ONNX model to int8 for ONNX Runtime.")
    p.add_argument("--checkpoint", default="camvid", help="built-in name, .safetensors checkpoint or run directory")
    p.add_argument("--format", dest="fmt", choices=("onnx", "torchscript", "safetensors"), required=True,
                   help="onnx, torchscript, or safetensors: a bfloat16 checkpoint, with --dtype bfloat16 (see the "
                        "precision gate)")
    p.add_argument("--out", required=True, type=Path,
                   help="output file (.onnx, .pt for TorchScript, or .safetensors for --format safetensors)")
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
    q.add_argument("--int8-weight-bits", type=int, choices=(7, 8), default=None, metavar="BITS",
                   help="7 or 8: the weights' range; 8 halves their rounding error but needs a CPU with VNNI "
                        "(x86 without it can saturate); default: 8 where this CPU has VNNI, else 7")
    q.add_argument("--min-agreement", type=float, default=None, metavar="SHARE",
                   help="fail (exit 1) if fewer pixels than this share keep their class (default 0.95; with "
                        "--gate-dataset none: the mean IU gate decides, agreement is only shown)")
    add_precision_arguments(p)
    return p


def second_check_size(h: int, w: int) -> tuple[int, int]:
    """The size of the second parity check: about half the export size, shifted by 17 and 29 pixels so that
    it matches neither the export size nor its aspect ratio -- a graph with a size baked in fails there."""
    return h // 2 + 17, w // 2 + 29


def calibration_batches(patterns: list[str], size: tuple[int, int], model, limit: int) -> list:
    """Normalised (1, 3, H, W) float32 arrays of up to ``limit`` images spread over ``patterns``."""
    from ..data.io import read_image
    from ..errors import FcnsegError
    from ..weights.export import calibration_batch
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

    from ..weights.checkpoint import load_checkpoint
    from ..errors import FcnsegError
    from ..weights.export import export, parity
    from ..weights.runtimes import load_exported
    from ..files import output_file
    from ..weights.checkpoint import check_checkpoint_name

    output_file(args.out, what="--out")
    hold_output(args, args.out)  # one writer per file
    check_checkpoint_name(args.checkpoint)
    check_precision_arguments(args)
    if args.int8 or args.calibrate or args.int8_layers or args.int8_weight_bits:
        if args.fmt != "onnx":
            raise FcnsegError("--int8 quantizes ONNX models only; use --format onnx")
        if (args.int8_layers or args.int8_weight_bits) and not args.int8:
            flag = "--int8-layers" if args.int8_layers else "--int8-weight-bits"
            raise FcnsegError(f"{flag} chooses how --int8 quantizes; add --int8")
        if not (args.int8 and args.calibrate):
            raise FcnsegError("--int8 and --calibrate go together: int8 needs images to calibrate on")
    model = load_checkpoint(args.checkpoint)
    h, w = args.size
    if args.gate_dataset or args.dtype != "float32":  # the gate's own path (precision block below)
        return run_precision(args, model, (h, w))
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
    from ..weights.export import export_onnx, parity, quantize_onnx
    from ..weights.runtimes import OnnxRuntimeModel

    batches = calibration_batches(args.calibrate, size, model, args.calibrate_limit)
    with tempfile.TemporaryDirectory(prefix="fcnseg-export-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "float32.onnx", example_size=size)
        path = quantize_onnx(fp32, args.out, batches, only=args.int8_layers, weight_bits=args.int8_weight_bits)
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
    bits = runtime.record.get("quantization", {}).get("weight_bits")
    print(f"wrote {path} (onnx int8, {bits}-bit weights, calibrated on {len(batches)} image(s), "
          f"{path.stat().st_size / 2**20:.1f} MB)")
    floor = args.min_agreement if args.min_agreement is not None else (0.0 if args.gate_dataset else 0.95)
    if worst < floor:
        raise FcnsegError(f"{path}: only {100 * worst:.2f}% of pixels keep their class after int8 quantization, "
                          f"less than --min-agreement {floor} (file kept for inspection)")
    return 0


# ---------------------------------------------------------------------------------------------------
# precision gate by mean IU (issue 16): --dtype bfloat16, --gate-*, --max-miou-drop, --sensitivity

def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation.precision import DEFAULT_MAX_MIOU_DROP

    g = p.add_argument_group(
        "precision gate (mean IU on labelled data)",
        "Score the float32 checkpoint and the lower-precision result (the --int8 ONNX model, or the bfloat16 "
        "checkpoint) on a labelled split, the way 'fcnseg evaluate' does, print both mean IUs and the change, and "
        "fail (exit 1, file kept for inspection) when mean IU drops by more than --max-miou-drop points. "
        "--dtype bfloat16 --format safetensors writes a checkpoint whose weights are stored in bfloat16 (half the "
        "size; the layers that compute in float32 stay float32) and whose record says \"inference_dtype\": \"bfloat16\" and which layers to keep float32; it is "
        "gated as it will run: the written file loaded back and converted by fcnseg.inference.optimize to bfloat16 (the FCN "
        "score and upsampling layers, and --keep-float32 layers, computing in float32). Run it with "
        "'--dtype bfloat16': fcnseg.inference.optimize keeps the recorded float32 layers wherever the file is loaded. "
        "--dtype bfloat16 --format onnx writes the float32 graph, its record saying \"inference_dtype\": \"bfloat16\", "
        "gated as OpenVINO runs it in bf16 inference precision ('--backend openvino --dtype bfloat16').")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: write a bfloat16 checkpoint (--format safetensors), or an ONNX model gated in "
                        "OpenVINO's bf16 inference precision (--format onnx)")
    g.add_argument("--keep-float32", nargs="+", default=[], metavar="LAYER",
                   help="with --dtype bfloat16: layers (module names, e.g. fc.fc7) that compute in float32; "
                        "--sensitivity shows which cost mean IU")
    g.add_argument("--gate-dataset", metavar="NAME", help="dataset family of the labelled split (camvid, ...)")
    g.add_argument("--gate-root", type=Path, metavar="DIR", help="its folder")
    g.add_argument("--gate-split", default="val", help="split to score (default val)")
    g.add_argument("--gate-limit", type=int, metavar="N", help="score only the first N images of the split")
    g.add_argument("--gate-backend", choices=("onnxruntime", "openvino"), default="onnxruntime",
                   help="with --int8: the runtime the gate and --sensitivity score the int8 model in; choose the one "
                        "it will run in (their int8 kernels round differently; default onnxruntime)")
    g.add_argument("--max-miou-drop", type=float, default=DEFAULT_MAX_MIOU_DROP, metavar="POINTS",
                   help=f"fail (exit 1, file kept) if mean IU drops by more than this many points "
                        f"(default {DEFAULT_MAX_MIOU_DROP})")
    g.add_argument("--sensitivity", action="store_true",
                   help="instead of exporting, convert one layer at a time (--int8 or --dtype bfloat16) and print "
                        "the mean IU each costs, worst first; writes nothing")
    g.add_argument("--sensitivity-depth", type=int, default=0, metavar="D",
                   help="group layers into blocks by the first D parts of their names (default 0: every layer)")


def check_precision_arguments(args: argparse.Namespace) -> None:
    """The gate's flags, checked before the model loads."""
    from ..errors import FcnsegError

    bf16 = args.dtype == "bfloat16"
    if bf16 and args.fmt == "torchscript":
        raise FcnsegError("--dtype bfloat16 writes a bfloat16 checkpoint (--format safetensors) or an ONNX model "
                          "for OpenVINO's bf16 precision (--format onnx), not TorchScript")
    if bf16 and args.fmt == "onnx" and args.keep_float32:
        raise FcnsegError("--keep-float32 chooses layers of a bfloat16 safetensors checkpoint; OpenVINO's bf16 "
                          "precision decides its own (use --format safetensors)")
    if args.fmt == "safetensors" and not bf16:
        raise FcnsegError("--format safetensors is for a bfloat16 checkpoint: add --dtype bfloat16")
    if args.fmt == "safetensors" and Path(args.out).suffix != ".safetensors":
        raise FcnsegError(f"--out {args.out}: a checkpoint is written as NAME.safetensors (and NAME.json)")
    if bf16 and (args.int8 or args.calibrate):
        raise FcnsegError("--dtype bfloat16 and --int8 are two different exports; choose one")
    if args.keep_float32 and not bf16:
        raise FcnsegError("--keep-float32 chooses what stays float32 in a bfloat16 export; add --dtype bfloat16")
    if bool(args.gate_dataset) != bool(args.gate_root):
        raise FcnsegError("--gate-dataset and --gate-root go together: the gate scores a labelled split")
    if args.gate_dataset and not (args.int8 or bf16):
        raise FcnsegError("the mean IU gate compares a lower precision with float32: add --int8 or --dtype bfloat16")
    if args.gate_backend != "onnxruntime" and not args.int8:
        raise FcnsegError("--gate-backend chooses where an --int8 model is scored; a --dtype bfloat16 ONNX model is "
                          "always gated in OpenVINO")
    if args.gate_backend != "onnxruntime" and not args.gate_dataset:
        raise FcnsegError("--gate-backend chooses where the gate scores the int8 model: add --gate-dataset and "
                          "--gate-root")
    if args.gate_backend == "openvino":
        from ..weights.runtimes import require_runtime

        require_runtime("openvino", "openvino")  # missing: said now, not after the export and the quantization
    if args.sensitivity and not args.gate_dataset:
        raise FcnsegError("--sensitivity measures mean IU: add --gate-dataset and --gate-root")
    if args.gate_limit is not None and args.gate_limit < 1:
        raise FcnsegError(f"--gate-limit must be at least 1, got {args.gate_limit}")
    if not args.max_miou_drop >= 0:
        raise FcnsegError(f"--max-miou-drop must be 0 or more points, got {args.max_miou_drop}")
    if args.sensitivity_depth < 0:
        raise FcnsegError(f"--sensitivity-depth must be 0 or more, got {args.sensitivity_depth}")


def run_precision(args: argparse.Namespace, model, size: tuple[int, int]) -> int:
    """--dtype bfloat16, or --int8 with the mean IU gate, or --sensitivity."""
    from ..evaluation.precision import labelled_dataset

    # the labelled split is read before the long work: a wrong path fails in a second
    gate = labelled_dataset(args.gate_dataset, args.gate_root, args.gate_split, model) if args.gate_dataset else None
    for name in args.keep_float32:
        _check_layer(model, name)
    if args.sensitivity:
        return _print_sensitivity(args, model, gate, size)
    if args.int8:
        code = _export_int8(args, model, size)
        if code or gate is None:
            return code
        from ..weights.checkpoint import open_model

        print(f"gate: the int8 model scored in {args.gate_backend}")
        return _gate(args, model, open_model(args.out, backend=args.gate_backend), gate, ready=True,
                     path=args.out, precision="int8", scored_in=args.gate_backend)
    if args.fmt == "onnx":
        return _export_onnx_bfloat16(args, model, gate, size)
    return _export_bfloat16(args, model, gate)


def _check_layer(model, name: str) -> None:
    from ..errors import FcnsegError

    try:
        model.get_submodule(name)
    except AttributeError:
        raise FcnsegError(f"--keep-float32 {name}: the model has no layer of that name") from None


def _gate(args: argparse.Namespace, model, candidate, gate, ready: bool, path, precision: str,
          scored_in: str) -> int:
    """Score ``candidate`` (the written file ``path``, run as it will be) against ``model`` on the gate's split,
    keep the result in the file's record (``precision_gate``), then pass or refuse."""
    import math

    from ..errors import FcnsegError
    from ..weights.export import add_to_record
    from ..evaluation.precision import miou_change

    if gate is None:
        return 0
    change = miou_change(model, candidate, gate, limit=args.gate_limit, candidate_ready=ready)
    print(change.describe())
    refused = change.exceeds(args.max_miou_drop)

    def points(v: float) -> float | None:  # JSON has no NaN: an undefined score is null
        return None if math.isnan(v) else round(100 * v, 4)

    add_to_record(path, {"precision_gate": {
        "precision": precision, "scored_in": scored_in, "dataset": args.gate_dataset, "split": args.gate_split,
        "images": change.images, "float32_mean_iou": points(change.reference), "mean_iou": points(change.candidate),
        "change_points": None if math.isnan(change.drop_points) else round(-change.drop_points, 4),
        "max_drop_points": args.max_miou_drop, "passed": not refused}})
    if refused:
        raise FcnsegError(f"{path}: mean IU drops by {change.drop_points:.2f} points, more than "
                          f"--max-miou-drop {args.max_miou_drop} (file kept for inspection)")
    return 0


def _export_bfloat16(args: argparse.Namespace, model, gate) -> int:
    import torch

    from ..weights.checkpoint import load_checkpoint, save_checkpoint
    from ..inference.optimize import FCN_FLOAT32_PARTS, optimize

    record = {**model.record.to_dict(), "inference_dtype": "bfloat16", "float32_layers": list(args.keep_float32)}
    # the parts that compute in float32 keep their float32 weights in the file too
    float32 = [f"{name}." for name in (*FCN_FLOAT32_PARTS, *args.keep_float32)]
    path = save_checkpoint(model, args.out, record, dtype=torch.bfloat16, keep_float32=float32)
    print(f"wrote {path} (bfloat16 weights, {path.stat().st_size / 2**20:.1f} MB)")
    # gated as it will run: the file itself, loaded back and converted
    written = optimize(load_checkpoint(path), "bfloat16", keep_float32=args.keep_float32, inplace=True)
    return _gate(args, model, written, gate, ready=True, path=path, precision="bfloat16", scored_in="pytorch")


def _export_onnx_bfloat16(args: argparse.Namespace, model, gate, size: tuple[int, int]) -> int:
    """A float32 ONNX model for OpenVINO's bf16 inference precision (the fast path on CPUs with bf16 units),
    its record saying so, gated as it will run: the written file in OpenVINO bf16 against the checkpoint."""
    import torch

    from ..weights.checkpoint import open_model
    from ..weights.export import export_onnx, parity

    path = export_onnx(model, args.out, example_size=size,
                       record_extra={"inference_dtype": "bfloat16", "inference_backend": "openvino"})
    runtime = open_model(path, backend="openvino", dtype="bfloat16")
    r = parity(model, runtime, torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)))
    print(f"OpenVINO bf16 parity at {size[0]}x{size[1]}: max |logit difference| {r['max_abs_logit_diff']:.3g}, "
          f"class agreement {100 * r['class_agreement']:.3f}%")
    print(f"wrote {path} (onnx float32 graph for OpenVINO bf16 precision: run it with --backend openvino "
          f"--dtype bfloat16, {path.stat().st_size / 2**20:.1f} MB)")
    return _gate(args, model, runtime, gate, ready=True, path=path, precision="bfloat16", scored_in="openvino")


def _print_sensitivity(args: argparse.Namespace, model, gate, size: tuple[int, int]) -> int:
    from ..evaluation.precision import format_sensitivity, layer_sensitivity

    precision = "int8" if args.int8 else "bfloat16"
    batches = calibration_batches(args.calibrate, size, model, args.calibrate_limit) if args.int8 else None
    rows = layer_sensitivity(model, gate, precision, depth=args.sensitivity_depth, limit=args.gate_limit,
                             calibration=batches, backend=args.gate_backend)
    where = f" ({args.gate_backend})" if args.int8 else ""
    print(f"mean IU change with one layer at a time in {precision}{where} (worst first; nothing written); float32: "
          f"{100 * rows[0]['reference_miou']:.2f} on {rows[0]['images']} image(s)")
    print(format_sensitivity(rows))
    return 0
