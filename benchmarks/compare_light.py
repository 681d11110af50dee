"""The built-in models (camvid: FCN-8s on EfficientNet-Lite0; siftflow: FCN-8s on EfficientNet-Lite2) side by side
with torchvision's light segmentation networks, LR-ASPP and DeepLabV3 on MobileNetV3-Large, at the same input size
and thread count.

Every configuration runs in a fresh process through ``fcnseg.evaluation.benchmark`` (warm-up, timed runs, peak memory =
peak resident memory during inference minus the process's memory after imports). Every model runs the same
way: converted by ``fcnseg.inference.optimize`` (batch norm folded, channels-last), in float32 and, where this CPU runs
bfloat16 natively (``fcnseg.hardware.native_bf16_cpu``), in bfloat16; the best of the two is marked. The
torchvision models have random weights (``weights=None, weights_backbone=None``) and as many classes as the
CamVid model: speed does not depend on the weights' values. Nothing is downloaded.

    OMP_NUM_THREADS=2 python benchmarks/compare_light.py --size 360 480 --iters 20
    python benchmarks/compare_light.py --iters 2 --size 64 96            # a quick check that it runs
"""
from __future__ import annotations

import argparse
import sys

TORCHVISION = {
    "lraspp_mobilenet_v3_large": "torchvision.models.segmentation:lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large": "torchvision.models.segmentation:deeplabv3_mobilenet_v3_large",
}


def configurations(num_classes: int, bf16: bool) -> list[tuple[str, str, dict]]:
    """(model label, dtype, benchmark spec) for every model and precision to time."""
    models = [("camvid (fcnseg)", {"model": "camvid"}), ("siftflow (fcnseg)", {"model": "siftflow"})]
    models += [(name, {"model": factory, "factory_kwargs": {"num_classes": num_classes, "weights": None,
                                                             "weights_backbone": None}})
               for name, factory in TORCHVISION.items()]
    dtypes = ["float32", "bfloat16"] if bf16 else ["float32"]
    return [(label, dtype, {**spec, "dtype": dtype}) for label, spec in models for dtype in dtypes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every run (default: torch's own)")
    parser.add_argument("--num-classes", type=int, default=11, help="classes of the torchvision models (CamVid's 11)")
    parser.add_argument("--float32-only", action="store_true", help="skip bfloat16 even where it is native")
    args = parser.parse_args()

    import torch

    from fcnseg.evaluation.benchmark import benchmark
    from fcnseg.hardware import native_bf16_cpu

    bf16 = native_bf16_cpu() and not args.float32_only
    rows = []
    for label, dtype, spec in configurations(args.num_classes, bf16):
        print(f"running {label} {dtype} ...", file=sys.stderr, flush=True)
        r = benchmark({**spec, "size": list(args.size), "batch": args.batch, "iters": args.iters,
                       "warmup": args.warmup, "threads": args.threads or None, "channels_last": True})
        rows.append((label, dtype, r))

    best = {}
    for label, dtype, r in rows:
        if label not in best or r["images_per_second"] > best[label]:
            best[label] = r["images_per_second"]
    h, w = args.size
    print(f"\n{h}x{w}, batch {args.batch}, {rows[0][2]['threads']} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bfloat16: {native_bf16_cpu()}"
          f"{' (not run: --float32-only)' if args.float32_only else ''}")
    width = max(len(label) for label, _, _ in rows)
    head = f"{'model':<{width}} {'dtype':<8} {'median ms':>10} {'p95 ms':>9} {'img/s':>8} {'peak MB':>8} {'GFLOP':>7}"
    print(head)
    print("-" * len(head))
    for label, dtype, r in rows:
        mark = " *" if r["images_per_second"] == best[label] and len(rows) > len(best) else ""
        gf = f"{r['gflops_per_batch']:.1f}" if r.get("gflops_per_batch") else "-"
        print(f"{label:<{width}} {dtype:<8} {r['latency_ms_median']:>10.1f} {r['latency_ms_p95']:>9.1f} "
              f"{r['images_per_second']:>8.2f} {r['peak_memory_mb']:>8.0f} {gf:>7}{mark}")
    if len(rows) > len(best):
        print("* the model's best precision on this CPU")
    print(f"peak memory: {rows[0][2]['peak_memory_method']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
