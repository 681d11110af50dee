"""Golden outputs: what users get from each built-in model through the public ``Segmenter`` API on a stored frame.

tests/golden/ holds a small drawn frame per built-in model, the class ids ``Segmenter.from_checkpoint(name)`` gave
for it and its per-class mean probabilities (written by scripts/make_golden.py). Tolerances: at least 99.5% of the
pixels keep their class (float32 kernels may differ in the last bits between CPUs, which can flip a pixel whose
two best classes tie), and every per-class mean probability within 0.002. A change of the model, its record
(normalisation, class order), the preprocessing or the inference path moves far more than that.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_models import load_script

GOLDEN = Path(__file__).parent / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
AGREEMENT, PROB_ATOL = 0.995, 0.002


@pytest.mark.parametrize("name", ["camvid", "siftflow"])
def test_builtin_model_output_is_preserved(name):
    from fcnseg.inference.segmenter import Segmenter

    image = Image.open(GOLDEN / f"{name}_drawn.png").convert("RGB")
    want_mask = np.asarray(Image.open(GOLDEN / f"{name}_drawn_mask.png"))
    seg = Segmenter.from_checkpoint(name)
    pred = seg.segment(image, probs=True)
    mask = pred.mask.numpy()
    assert mask.shape == want_mask.shape == (image.height, image.width)
    agree = float((mask == want_mask).mean())
    assert agree >= AGREEMENT, f"{name}: {100 * agree:.2f}% of the pixels keep their class"
    mean_probs = pred.probs.float().mean((1, 2)).numpy()
    np.testing.assert_allclose(mean_probs, EXPECTED[name]["mean_probs"], atol=PROB_ATOL)
    # the frame is segmented into several classes, not one: the golden file is not a degenerate output
    assert sum(c > 0.05 * mask.size for c in EXPECTED[name]["class_pixels"]) >= 2


def test_the_stored_frames_are_the_generators():
    """The stored frames are what scripts/make_golden.py draws, so the goldens can be regenerated."""
    make = load_script("scripts/make_golden.py")
    for name in ("camvid", "siftflow"):
        stored = np.asarray(Image.open(GOLDEN / f"{name}_drawn.png").convert("RGB"))
        assert np.array_equal(np.asarray(make.frame(name)), stored), name
