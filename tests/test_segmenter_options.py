"""Segmenter's option objects (``fcnseg.Tiling``, ``fcnseg.TTA``, ``fcnseg.Resize``): the same masks as the flat
keywords they group, checked values with one-line errors, and no silent mixing of both spellings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fcnseg
from fcnseg import TTA, Resize, Segmenter, Tiling
from fcnseg.errors import FcnsegError

from tiny_models import random_image, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("flat, grouped", [
    (dict(tile=256, overlap=64, batch_size=2), dict(tiling=Tiling(tile=256, overlap=64, batch_size=2))),
    (dict(flip=True, scales=(0.5, 1.0)), dict(tta=TTA(flip=True, scales=(0.5, 1.0)))),
    (dict(max_side=200), dict(resize=Resize(max_side=200))),
    (dict(scale=0.75), dict(resize=Resize(scale=0.75))),
    (dict(tile=256, overlap=64, flip=True, max_side=300),
     dict(tiling=Tiling(tile=256, overlap=64), tta=TTA(flip=True), resize=Resize(max_side=300))),
])
def test_option_objects_give_the_same_masks_as_the_flat_keywords(flat, grouped):
    model = tiny_model()
    images = [random_image(300, 420, 1), random_image(300, 420, 2), random_image(61, 83, 3)]
    by_flat, by_objects = Segmenter(model, **flat), Segmenter(model, **grouped)
    for a, b in zip(by_flat.predict(images, probs=True), by_objects.predict(images, probs=True)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.probs, b.probs)
    for name in ("tile", "overlap", "batch_size", "flip", "scales", "max_side", "scale"):
        assert getattr(by_flat, name) == getattr(by_objects, name), name
    assert (by_flat.tiling, by_flat.tta, by_flat.resize) == (by_objects.tiling, by_objects.tta, by_objects.resize)


def test_defaults_are_the_old_defaults_and_the_objects_are_frozen_and_normalised():
    seg = Segmenter(tiny_model())
    assert (seg.tiling, seg.tta, seg.resize) == (Tiling(1024, 256, 4), TTA(False, (1.0,)), Resize("auto", None))
    assert Tiling(tile=512.0, batch_size=0) == Tiling(512, 256, 1)  # int() as before; batch_size below 1 is 1
    assert TTA(flip=1, scales=[1, 0.5]).scales == (1.0, 0.5)
    assert Resize(max_side=0).max_side is None and Resize(max_side=640.0).max_side == 640
    with pytest.raises(AttributeError):
        Tiling().tile = 1  # type: ignore[misc]
    assert {"Tiling", "TTA", "Resize"} <= set(fcnseg.__all__)


@pytest.mark.parametrize("make, message", [
    (lambda: TTA(scales=(1.0, 0.0)), "scales must be positive numbers"),
    (lambda: TTA(scales=()), "scales must be positive numbers"),
    (lambda: Resize(scale=0), r"scale must be a number in \(0, 16\]"),
    (lambda: Resize(scale=17), r"scale must be a number in \(0, 16\]"),
    (lambda: Resize(scale="2"), r"scale must be a number in \(0, 16\]"),
    (lambda: Resize(max_side=-1), "max_side must be 'auto', a pixel count or 0"),
    (lambda: Resize(max_side="big"), "max_side must be 'auto', a pixel count or 0"),
    (lambda: Tiling(tile="big"), "tile must be a whole number"),
    (lambda: Tiling(overlap=None), "overlap must be a whole number"),
    (lambda: Segmenter(tiny_model(), scales=(-1.0,)), "scales must be positive numbers"),
    (lambda: Segmenter(tiny_model(), max_side=-5), "max_side must be 'auto'"),
    (lambda: Segmenter(tiny_model(), tiling=Tiling(), tile=512), "not both"),
    (lambda: Segmenter(tiny_model(), tta={"flip": True}), "tta must be a fcnseg.TTA"),
])
def test_bad_values_are_one_line_errors(make, message):
    with pytest.raises(FcnsegError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_flat_keywords_of_another_group_combine_with_an_object():
    model, img = tiny_model(), random_image(64, 96, 4)
    seg = Segmenter(model, tiling=Tiling(tile=4096), flip=True)
    assert seg.tile == 4096 and seg.flip is True
    assert np.array_equal(seg(img), Segmenter(model, tile=4096, tta=TTA(flip=True))(img))


def test_the_tile_overlap_rule_still_depends_on_the_networks_stride():
    # tile 100 inside an overlap of 200 is only an error once an image is large enough to be tiled
    seg = Segmenter(tiny_model(), tiling=Tiling(tile=100, overlap=200))
    assert seg(random_image(64, 96)).shape == (64, 96)
    with pytest.raises(FcnsegError, match="leaves no room inside an overlap"):
        seg(random_image(160, 96))
