"""Write tests/golden/: a small synthetic frame per built-in model and what ``Segmenter`` makes of it.

    python scripts/make_golden.py          # after a deliberate change to a built-in model or to inference

For each built-in model (camvid, siftflow) it draws a frame (``frame(name)``: a street, a landscape; drawn,
not taken from the datasets, so the repository holds no dataset pixels), saves it as
``<name>_drawn.png``, runs ``Segmenter.from_checkpoint(name)`` on it and saves the class ids as
``<name>_drawn_mask.png`` and the per-class mean probability and the class histogram in ``expected.json``.
tests/test_golden.py compares what the current code gives with these files (tolerances stated there).
Run it only when a change of the outputs is intended, and say so in the commit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
SIZES = {"camvid": (180, 240), "siftflow": (128, 128)}  # (H, W): below each model's working size


def frame(name: str) -> Image.Image:
    """A deterministic synthetic scene for the built-in model ``name``, with mild noise so that it is not flat."""
    h, w = SIZES[name]
    im = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(im)
    if name == "camvid":  # overcast sky, two buildings, a tree, road, pavement, a car

        def at(x: float, y: float) -> tuple[float, float]:
            return x * w, y * h

        d.rectangle([*at(0, 0), *at(1, .35)], fill=(190, 198, 208))
        d.rectangle([*at(0, .15), *at(.4, .6)], fill=(120, 90, 70))
        d.rectangle([*at(.65, .1), *at(1, .6)], fill=(150, 140, 130))
        d.ellipse([*at(.38, .2), *at(.62, .58)], fill=(60, 90, 40))
        d.rectangle([*at(0, .6), *at(1, 1)], fill=(90, 84, 92))
        d.polygon([at(0, .6), at(.3, .6), at(0, .85)], fill=(150, 140, 120))
        d.rectangle([*at(.6, .62), *at(.88, .82)], fill=(30, 40, 120))
    else:  # sky, mountains, sea, sand, a tree
        d.rectangle([0, 0, w, 50], fill=(120, 170, 230))
        d.polygon([(0, 60), (30, 28), (60, 55), (90, 22), (128, 58), (128, 70), (0, 70)], fill=(95, 100, 90))
        d.rectangle([0, 70, w, 100], fill=(30, 80, 140))
        d.rectangle([0, 100, w, h], fill=(210, 190, 140))
        d.ellipse([95, 60, 125, 100], fill=(40, 110, 40))
    rng = np.random.default_rng(0)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-4, 5, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def outputs(name: str, image: Image.Image) -> tuple[np.ndarray, list[float]]:
    """Class ids (H, W) and the per-class mean probability that ``Segmenter.from_checkpoint(name)`` gives."""
    from fcnseg.inference.segmenter import Segmenter

    seg = Segmenter.from_checkpoint(name)
    pred = seg.segment(image, probs=True)
    return pred.mask.numpy().astype(np.uint8), pred.probs.float().mean((1, 2)).tolist()


def main() -> int:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name in SIZES:
        image = frame(name)
        image.save(GOLDEN / f"{name}_drawn.png", optimize=True)
        image = Image.open(GOLDEN / f"{name}_drawn.png").convert("RGB")  # what the test reads
        mask, mean_probs = outputs(name, image)
        Image.fromarray(mask).save(GOLDEN / f"{name}_drawn_mask.png", optimize=True)
        counts = np.bincount(mask.ravel(), minlength=len(mean_probs)).tolist()
        expected[name] = {"mean_probs": [round(p, 6) for p in mean_probs], "class_pixels": counts}
        print(f"{name}: classes {sorted(set(mask.ravel().tolist()))}, pixels per class {counts}")
    (GOLDEN / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
