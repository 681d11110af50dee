"""Does high uncertainty fall where the mask is wrong? Error rate in the most uncertain 10% of labelled val
pixels against the rest, for normalised entropy and 1 - margin, and an optional picture.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/uncertainty_error.py --root /work/shared/datasets/camvid \
        --picture docs/img/uncertainty.png

Per-pixel uncertainties go into 1000-bin histograms of wrong and right pixels (void ignored), so memory does
not grow with the split; the 10% threshold is read from the histogram (to a bin, 0.001).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from fcnseg import Segmenter
from fcnseg.data import build_dataset
from fcnseg.inference.uncertainty import MEASURES, to_png_array, uncertainty

BINS = 1000


def top_share_error(wrong: np.ndarray, right: np.ndarray, share: float) -> dict:
    """Error rates above and below the uncertainty threshold that leaves ``share`` of pixels above it."""
    total = wrong + right
    above = np.cumsum(total[::-1])[::-1]  # pixels with uncertainty >= bin b
    b = int(np.argmax(above <= share * total.sum())) if (above <= share * total.sum()).any() else BINS - 1
    hi_w, hi_n = wrong[b:].sum(), total[b:].sum()
    lo_w, lo_n = wrong[:b].sum(), total[:b].sum()
    return {"threshold": b / BINS, "share_above": float(hi_n / total.sum()),
            "error_above": float(hi_w / max(hi_n, 1)), "error_below": float(lo_w / max(lo_n, 1)),
            "share_of_errors_above": float(hi_w / max(wrong.sum(), 1)),
            "error_overall": float(wrong.sum() / total.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/work/shared/datasets/camvid")
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--checkpoint", default="camvid")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="frames to use (0: all)")
    p.add_argument("--share", type=float, default=0.1, help="the most uncertain share of pixels (default 0.1)")
    p.add_argument("--picture", default=None, help="PNG: image | errors (red) | entropy, for the first frame")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    data = build_dataset(args.dataset, args.root, args.split, transforms=lambda im, m: (im, m))
    seg = Segmenter.from_checkpoint(args.checkpoint)
    hist = {m: (np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)) for m in MEASURES}
    n = min(args.limit, len(data)) if args.limit else len(data)
    for i in range(n):
        image, mask = data.load(i)
        pred = seg.segment(image, probs=True)
        labels = torch.from_numpy(np.asarray(mask).astype(np.int64))
        valid = labels != data.ignore_index
        wrong = (pred.mask.long() != labels) & valid
        for m in MEASURES:
            u = uncertainty(pred.probs, m)
            bins = (u * BINS).long().clamp_(0, BINS - 1)
            hist[m][0][:] += np.bincount(bins[wrong].numpy(), minlength=BINS)
            hist[m][1][:] += np.bincount(bins[valid & ~wrong].numpy(), minlength=BINS)
        if i == 0 and args.picture:
            err = np.asarray(image).copy()
            err[wrong.numpy()] = (255, 0, 0)
            ent = np.repeat(to_png_array(uncertainty(pred.probs, "entropy"))[:, :, None], 3, axis=2)
            Image.fromarray(np.concatenate([np.asarray(image), err, ent], axis=1)).save(args.picture)
        print(f"{i + 1}/{n} {data.names[i]}", flush=True)
    rows = {m: top_share_error(*hist[m], args.share) for m in MEASURES}
    print(f"{n} {args.dataset} {args.split} images; most uncertain {args.share:.0%} of labelled pixels vs the rest")
    print(f"{'measure':<10} {'error in top':>12} {'error in rest':>13} {'errors caught':>13} {'overall':>8}")
    for m, r in rows.items():
        print(f"{m:<10} {100 * r['error_above']:>11.1f}% {100 * r['error_below']:>12.1f}% "
              f"{100 * r['share_of_errors_above']:>12.1f}% {100 * r['error_overall']:>7.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": n, "share": args.share, **rows}, f, indent=2)


if __name__ == "__main__":
    main()
