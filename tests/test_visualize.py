"""Pictures of masks: colorize (the one used by predict overlays and the training report's image grids)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcnseg.train import report
from fcnseg.inference.visualize import colorize, overlay

COLORS = [[10, 20, 30], [200, 100, 0], [0, 0, 255]]


def test_the_default_palette_is_the_voc_colour_map():
    from fcnseg.record import default_palette

    voc = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
           [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128], [192, 0, 128],
           [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]]
    assert default_palette(21) == voc


def test_colorize_colours_ids_and_blacks_out_ignored_and_unknown_ids():
    mask = np.array([[0, 1, 2], [255, 7, 1]])
    rgb = colorize(mask, COLORS)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[0].tolist() == COLORS and rgb[1].tolist() == [[0, 0, 0], [0, 0, 0], COLORS[1]]
    assert report.colorize is colorize  # the training report draws with the same function


def test_colorize_without_an_ignore_index_draws_class_255():
    colors = np.zeros((256, 3), np.uint8)
    colors[255] = [1, 2, 3]
    assert colorize(np.array([[255]]), colors)[0, 0].tolist() == [0, 0, 0]
    assert colorize(np.array([[255]]), colors, ignore_index=None)[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="256"):
        colorize(np.zeros((1, 1), int), np.zeros((257, 3), np.uint8))


def test_overlay_blends_the_class_colour_over_the_image():
    image = Image.new("RGB", (2, 1), (100, 100, 100))
    out = np.asarray(overlay(image, np.array([[0, 2]]), np.array(COLORS, np.uint8), alpha=0.5))
    assert out.tolist() == [[[55, 60, 65], [50, 50, 178]]]  # (100 + c) / 2, rounded half up
