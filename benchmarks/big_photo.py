"""Photos of any size: mean IU of the default (working-scale) mask of an upscaled CamVid val frame against the
upscaled labels, next to the small frame's own mean IU and to native-scale segmentation; peak memory too.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/big_photo.py --root /work/shared/datasets/camvid --limit 10

Each val frame (480 x 360) is enlarged bilinearly to --size (default 4000 x 3000, a phone photo) and its
labels by nearest neighbour; the three masks are scored against the labels of their own size with one
confusion matrix each over all frames (void ignored), as ``fcnseg evaluate`` does.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from PIL import Image

from fcnseg import Segmenter
from fcnseg.data import build_dataset
from fcnseg.evaluation.metrics import ConfusionMatrix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/work/shared/datasets/camvid")
    p.add_argument("--checkpoint", default="camvid")
    p.add_argument("--split", default="val")
    p.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"))
    p.add_argument("--limit", type=int, default=10, help="frames to score (0: all)")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=True,
                   help="also score native-scale segmentation of the big photo (slow: tiles of 1024 px)")
    p.add_argument("--json", default=None, help="write the table as JSON")
    args = p.parse_args()

    data = build_dataset("camvid", args.root, args.split, transforms=lambda im, m: (im, m))
    seg = Segmenter.from_checkpoint(args.checkpoint)
    native = Segmenter.from_checkpoint(args.checkpoint, max_side=0) if args.native else None
    k = seg.num_classes
    cms = {name: ConfusionMatrix(k) for name in ("small", "big", "native")}
    n = min(args.limit, len(data)) if args.limit else len(data)
    seconds = {"small": 0.0, "big": 0.0, "native": 0.0}
    for i in range(n):
        image, mask = data.load(i)
        big = image.resize(tuple(args.size), Image.BILINEAR)
        big_labels = torch.from_numpy(np.asarray(mask.resize(tuple(args.size), Image.NEAREST)).astype(np.int64))
        small_labels = torch.from_numpy(np.asarray(mask).astype(np.int64))
        for name, segmenter, im, labels in (("small", seg, image, small_labels), ("big", seg, big, big_labels),
                                            ("native", native, big, big_labels)):
            if segmenter is None:
                continue
            t = time.perf_counter()
            pred = torch.from_numpy(segmenter(im).astype(np.int64))
            seconds[name] += time.perf_counter() - t
            cms[name].update(labels, pred)
        print(f"{i + 1}/{n} {data.names[i]}", flush=True)
    rows = {}
    for name, cm in cms.items():
        if name == "native" and native is None:
            continue
        s = cm.compute(class_names=data.classes)
        rows[name] = {"mean_iou": s["mean_iou"], "pixel_accuracy": s["pixel_accuracy"],
                      "seconds_per_image": seconds[name] / max(n, 1)}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} {args.split} frames, big photo {args.size[0]} x {args.size[1]}; peak RSS {peak_mb:.0f} MB")
    print(f"{'mask':<28} {'mean IU':>8} {'pixel acc.':>10} {'s/image':>8}")
    labels = {"small": "small frame (training scale)", "big": "big photo, default predict",
              "native": "big photo, native scale"}
    for name, r in rows.items():
        print(f"{labels[name]:<28} {100 * r['mean_iou']:>8.2f} {100 * r['pixel_accuracy']:>10.2f} "
              f"{r['seconds_per_image']:>8.2f}")
    if "big" in rows:
        print(f"difference big - small: {100 * (rows['big']['mean_iou'] - rows['small']['mean_iou']):+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": n, "size": list(args.size), "peak_rss_mb": round(peak_mb), **rows}, f, indent=2)


if __name__ == "__main__":
    main()
