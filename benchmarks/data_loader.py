"""Training-pipeline throughput: a dataset with its training preset through a DataLoader, in images/s.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_loader.py --root /work/shared/datasets/camvid

Reads, checks, decodes and augments exactly as training does (random scale, crop, flip, jitter,
normalisation), so the number is what the loader can feed a training loop.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from fcnseg.data import build_dataset, build_transforms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--root", default="/work/shared/datasets/camvid")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="crop size (default: the preset's, 360 480 for CamVid)")
    p.add_argument("--images", type=int, default=240, help="images to time after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="batches before timing starts (worker start-up)")
    args = p.parse_args()

    torch.set_num_threads(1)
    transforms = build_transforms(args.dataset, train=True, crop_size=args.crop)
    dataset = build_dataset(args.dataset, args.root, args.split, transforms=transforms)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0)
    batches = -(-args.images // args.batch_size)
    seen, start, shape = 0, None, None
    while start is None or seen < batches * args.batch_size:
        for i, (images, masks) in enumerate(loader):
            if start is None and i + 1 == args.warmup:
                start, shape = time.perf_counter(), tuple(images.shape[2:])
                continue
            if start is not None:
                seen += images.shape[0]
                if seen >= batches * args.batch_size:
                    break
    elapsed = time.perf_counter() - start
    print(f"{args.dataset} {args.split} {shape[0]}x{shape[1]}, training preset, {args.workers} workers, "
          f"batch {args.batch_size}: {seen / elapsed:.1f} images/s ({seen} images in {elapsed:.2f} s; "
          f"{1000 * elapsed / seen * max(args.workers, 1):.1f} ms wall x workers per image)")


if __name__ == "__main__":
    main()
