"""``fcnseg benchmark``: latency, throughput, peak memory and achieved GFLOP/s of one model configuration."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("benchmark", help="measure latency, images/s, peak memory and GFLOP/s (fresh process per run)",
                       description="Warm up, then time --iters forward passes in a fresh process. Peak memory is "
                                   "the process's peak resident memory during inference minus its memory after "
                                   "imports (weights included); see fcnseg.evaluation.benchmark for the method.")
    p.add_argument("--model", required=True,
                   help="registered architecture (random weights), checkpoint, or .onnx file (onnxruntime or "
                        "openvino backend)")
    p.add_argument("--size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"), help="input height and width (default 500 500)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                   help="onnxruntime or openvino: an .onnx file as is, or a model exported to a temporary ONNX file "
                        "first (openvino --dtype bfloat16: OpenVINO's bf16 inference precision)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations (default float32)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the default NCHW memory format")
    p.add_argument("--num-classes", type=int, default=21, help="classes for a registered architecture (default 21)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    p.add_argument("--iters", type=int, default=10, help="timed passes (default 10)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's choice)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    return p


def run(args: argparse.Namespace) -> int:
    from ..evaluation.benchmark import benchmark, export_for_onnxruntime, format_results
    from ..files import atomic_write
    from ..weights.checkpoint import resolve_checkpoint
    from ..registry import list_models

    if args.dtype == "bfloat16" and args.device == "cpu":
        from ..hardware import bf16_slowness

        slow = bf16_slowness()  # the run itself is in another process, where its warning would be lost
        if slow:
            print(f"fcnseg: warning: {slow}", file=sys.stderr)
    spec = {"model": args.model, "num_classes": args.num_classes, "backend": args.backend, "dtype": args.dtype,
            "channels_last": args.channels_last, "size": list(args.size), "batch": args.batch,
            "warmup": args.warmup, "iters": args.iters, "threads": args.threads, "device": args.device}
    if args.model not in list_models() and not args.model.endswith(".onnx"):
        spec["model"] = str(resolve_checkpoint(args.model))
    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as tmp:
        if args.backend != "torch" and not args.model.endswith(".onnx"):
            spec.update(export_for_onnxruntime(spec, Path(tmp) / "model.onnx"))
        result = benchmark(spec)
    label = f"{args.model} {args.backend} {args.dtype} {args.size[0]}x{args.size[1]} batch {args.batch}"
    print(format_results([result], [label]))
    print(f"peak memory: {result['peak_memory_method']}; {result['threads']} threads")
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return 0

