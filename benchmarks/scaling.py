"""How time and memory per image grow with image size (0.25 to 12 megapixels) through ``Segmenter``
with tiling: time should grow linearly with pixels, peak memory should level off once images are tiled.

Each size runs in a fresh process (``fcnseg.evaluation.benchmark``, mode "segmenter": uint8 image in, mask out,
tiling included). Random weights: speed does not depend on them.

    OMP_NUM_THREADS=2 python benchmarks/scaling.py --model fcn8s_efficientnet_lite0 --num-classes 11
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

SIZES = [(500, 500), (1000, 1000), (1500, 2000), (2000, 3000), (3000, 4000)]  # 0.25, 1, 3, 6, 12 MP


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fcn8s_efficientnet_lite0")
    parser.add_argument("--num-classes", type=int, default=11)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=256)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="H W",
                        help="pairs of H W (default: 500 500  1000 1000  1500 2000  2000 3000  3000 4000)")
    args = parser.parse_args()

    from fcnseg.evaluation.benchmark import benchmark

    sizes = list(zip(args.sizes[::2], args.sizes[1::2])) if args.sizes else SIZES
    rows = []
    for h, w in sizes:
        print(f"running {h}x{w} ...", file=sys.stderr, flush=True)
        r = benchmark({"model": args.model, "num_classes": args.num_classes, "mode": "segmenter",
                       "size": [h, w], "dtype": args.dtype, "tile": args.tile, "overlap": args.overlap,
                       "iters": args.iters, "warmup": args.warmup})
        rows.append((h, w, r))

    print(f"\n{args.model} ({args.num_classes} classes, {args.dtype}) through Segmenter, tile {args.tile}, "
          f"overlap {args.overlap}, {rows[0][2]['threads']} threads")
    head = f"{'size':>11} {'MP':>6} {'s/image':>9} {'ms/MP':>8} {'peak MB':>8} {'GFLOP/s':>8}"
    print(head)
    print("-" * len(head))
    mps, secs = [], []
    for h, w, r in rows:
        mp = h * w / 1e6
        s = r["latency_ms_median"] / 1000
        mps.append(mp)
        secs.append(s)
        gf = f"{r['gflops_per_second']:.0f}" if r.get("gflops_per_second") else "-"
        print(f"{f'{h}x{w}':>11} {mp:>6.2f} {s:>9.2f} {1000 * s / mp:>8.0f} {r['peak_memory_mb']:>8.0f} {gf:>8}")
    if len(rows) >= 2:
        slope, intercept = np.polyfit(mps, secs, 1)
        fit = np.polyval([slope, intercept], mps)
        r2 = 1 - np.sum((np.array(secs) - fit) ** 2) / max(np.sum((np.array(secs) - np.mean(secs)) ** 2), 1e-12)
        print(f"linear fit: time = {intercept:.3f} s + {slope:.3f} s/MP x megapixels (R^2 = {r2:.4f})")
    print(f"peak memory: {rows[0][2]['peak_memory_method']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
