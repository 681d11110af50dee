"""Photos of any size: mean IU of the default (working-scale) mask of enlarged dataset frames against the
enlarged labels, next to the same frames' mean IU at their own size; peak memory too.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/big_photo.py --root /work/shared/datasets/camvid --split val \
        --photos 4000x3000 3000x4000exif 1920x1080 --limit 0

Each frame (CamVid: 480 x 360) becomes a photo of each ``--photos`` kind:
- ``WxH``: the frame, cut at its centre to the photo's aspect ratio when that differs (1920x1080 from 4:3
  frames is a 16:9 cut), enlarged to W x H (``--enlarge``: bicubic by default, as a camera's sharper photo
  than a bilinear blow-up would be; bilinear is there to compare); its labels cut the same way and enlarged
  by nearest neighbour;
- ``WxHexif``: the same upright photo, stored on disk as a camera stores a portrait shot (the pixels turned
  a quarter, the EXIF orientation tag saying how to turn them back; PNG, lossless) and read back through
  ``fcnseg.data.io.read_image``, as ``fcnseg predict`` reads it.
Each photo's mask (``Segmenter``'s default working-scale resize) is scored against its labels, and the frame's
own cut at its own size against its labels, with one confusion matrix each over all frames (void ignored), as
``fcnseg evaluate`` does. The gap "photo - small" is what the working-scale resize loses; the target is a gap
within 2 points of mean IU on every split and photo kind. ``--native`` also scores native-scale segmentation
(no resize, tiles of 1024 px: slow).
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fcnseg import Segmenter
from fcnseg.data import build_dataset
from fcnseg.data.io import read_image
from fcnseg.evaluation.metrics import ConfusionMatrix

EXIF_ORIENTATION = 0x0112
ENLARGE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class Photo:
    """One kind of photo: its upright size and whether it is stored turned with an EXIF tag."""

    width: int
    height: int
    exif: bool = False

    @classmethod
    def parse(cls, text: str) -> "Photo":
        m = re.fullmatch(r"(\d+)x(\d+)(exif)?", text)
        if not m:
            raise argparse.ArgumentTypeError(f"photo kind {text!r}: expected WxH or WxHexif, e.g. 4000x3000")
        return cls(int(m[1]), int(m[2]), bool(m[3]))

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}{' EXIF-turned' if self.exif else ''}"


def centre_cut(image: Image.Image, mask: Image.Image, aspect: float) -> tuple[Image.Image, Image.Image]:
    """The largest centred box of ``aspect`` (width / height) of the frame and its labels."""
    w, h = image.size
    if abs(w / h - aspect) < 1e-3:
        return image, mask
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    return image.crop(box), mask.crop(box)


def as_camera_stores_it(photo: Image.Image, folder: Path) -> Image.Image:
    """``photo`` written as a portrait shot is stored (turned a quarter, EXIF orientation 6: "turn 90 degrees
    clockwise to show it") and read back by fcnseg's reader, which turns it upright again."""
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: the sensor's view of the scene
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = folder / "photo.png"
    stored.save(path, format="PNG", exif=exif)
    return read_image(path)


def labels_of(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask).astype(np.int64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--root", default="/work/shared/datasets/camvid")
    p.add_argument("--checkpoint", default="camvid")
    p.add_argument("--split", default="val", help="e.g. val, or dev (the train-dev split the recipes choose on)")
    p.add_argument("--photos", type=Photo.parse, nargs="+", default=[Photo(4000, 3000)], metavar="WxH[exif]")
    p.add_argument("--enlarge", choices=sorted(ENLARGE), default="bicubic",
                   help="how frames are blown up to photos (bilinear blurs more than a camera does)")
    p.add_argument("--limit", type=int, default=10, help="frames to score (0: all)")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=False,
                   help="also score native-scale segmentation of each photo (slow: tiles of 1024 px)")
    p.add_argument("--json", default=None, help="write the table as JSON")
    args = p.parse_args()

    data = build_dataset(args.dataset, args.root, args.split, transforms=lambda im, m: (im, m))
    seg = Segmenter.from_checkpoint(args.checkpoint)
    native = Segmenter.from_checkpoint(args.checkpoint, max_side=0) if args.native else None
    k = seg.num_classes
    n = min(args.limit, len(data)) if args.limit else len(data)
    kinds = [(photo, role) for photo in args.photos for role in ("small", "photo", "native")
             if role != "native" or native is not None]
    cms = {kind: ConfusionMatrix(k) for kind in kinds}
    seconds = {kind: 0.0 for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            image, mask = data.load(i)
            for photo in args.photos:
                small, small_mask = centre_cut(image, mask, photo.width / photo.height)
                big = small.resize((photo.width, photo.height), ENLARGE[args.enlarge])
                big_labels = labels_of(small_mask.resize((photo.width, photo.height), Image.NEAREST))
                if photo.exif:
                    big = as_camera_stores_it(big, Path(tmp))
                    assert big.size == (photo.width, photo.height), "the reader did not turn the photo upright"
                for role, segmenter, im, labels in (("small", seg, small, labels_of(small_mask)),
                                                    ("photo", seg, big, big_labels), ("native", native, big, big_labels)):
                    if segmenter is None:
                        continue
                    t = time.perf_counter()
                    pred = torch.from_numpy(segmenter(im).astype(np.int64))
                    seconds[(photo, role)] += time.perf_counter() - t
                    cms[(photo, role)].update(labels, pred)
            print(f"{i + 1}/{n} {data.names[i]}", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} {args.dataset} {args.split} frames, {args.checkpoint}, enlarged {args.enlarge}; peak RSS {peak_mb:.0f} MB; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"{'photo':<22} {'mask':<26} {'mean IU':>8} {'pixel acc.':>10} {'s/image':>8}")
    rows = []
    labels = {"small": "frame at its own size", "photo": "photo, default predict", "native": "photo, native scale"}
    for (photo, role), cm in cms.items():
        s = cm.compute(class_names=data.classes)
        row = {"photo": photo.name, "mask": role, "mean_iou": s["mean_iou"], "pixel_accuracy": s["pixel_accuracy"],
               "seconds_per_image": seconds[(photo, role)] / max(n, 1)}
        rows.append(row)
        print(f"{photo.name:<22} {labels[role]:<26} {100 * row['mean_iou']:>8.2f} {100 * row['pixel_accuracy']:>10.2f} "
              f"{row['seconds_per_image']:>8.2f}")
    for photo in args.photos:
        small, big = (next(r for r in rows if r["photo"] == photo.name and r["mask"] == m) for m in ("small", "photo"))
        print(f"gap {photo.name}: photo - small {100 * (big['mean_iou'] - small['mean_iou']):+.2f} points of mean IU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": n, "split": args.split, "checkpoint": args.checkpoint, "enlarge": args.enlarge,
                       "peak_rss_mb": round(peak_mb), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
