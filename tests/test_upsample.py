"""Bilinear upsampling: one kernel function, checked against the Caffe reference's formula and
against torch.nn.functional.interpolate; the three Upsample modes agree at init."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcnseg.models.geometry import Geometry
from fcnseg.models.upsample import UPSAMPLE_MODES, Upsample, bilinear_kernel


def upsample_filt(size: int) -> np.ndarray:
    """surgery.upsample_filt from the FCN reference (fcn.berkeleyvision.org), verbatim in numpy."""
    factor = (size + 1) // 2
    if size % 2 == 1:
        center = factor - 1
    else:
        center = factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


@pytest.mark.parametrize("size", [3, 4, 5, 16, 32, 64])
def test_kernel_is_the_reference_upsample_filt(size):
    k = bilinear_kernel(size)
    assert k.shape == (size, size) and k.dtype == torch.float32
    np.testing.assert_allclose(k.numpy(), upsample_filt(size), rtol=0, atol=1e-7)


def test_kernel_values_by_hand():
    assert bilinear_kernel(4)[0].tolist() == pytest.approx([0.0625, 0.1875, 0.1875, 0.0625])
    assert bilinear_kernel(4)[1].tolist() == pytest.approx([0.1875, 0.5625, 0.5625, 0.1875])


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("signal", ["ramp", "random"])
def test_fixed_upsampling_matches_interpolate_away_from_borders(factor, signal):
    """Stride-f transposed convolution with the 2f bilinear kernel is bilinear interpolation
    (align_corners=False) shifted by f/2 pixels, its output starting half a kernel earlier; away
    from the borders it equals F.interpolate on any input, and a ramp stays a ramp."""
    n = 6
    if signal == "ramp":
        x = (0.5 * torch.arange(n).view(n, 1) - 1.5 * torch.arange(n).view(1, n)).float().expand(1, 2, n, n)
    else:
        x = torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(factor))
    up = Upsample(2, factor, mode="bilinear")
    with torch.no_grad():
        y = up(x)  # (1, 2, (n + 1) f, (n + 1) f)
    z = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)  # (1, 2, n f, n f)
    assert y.shape[-1] == (n + 1) * factor and z.shape[-1] == n * factor
    shift = factor // 2
    aligned = y[..., shift:shift + n * factor, shift:shift + n * factor]
    inner = (..., slice(factor, -factor), slice(factor, -factor))
    torch.testing.assert_close(aligned[inner], z[inner], atol=1e-5, rtol=1e-5)
    if signal == "ramp":  # the interpolated ramp's slope is the input's slope / factor
        d = aligned[inner][0, 0]
        torch.testing.assert_close(d[1:] - d[:-1], torch.full_like(d[1:], 0.5 / factor), atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_all_modes_agree_at_init(factor):
    x = torch.randn(2, 5, 4, 3)
    with torch.no_grad():
        outs = {mode: Upsample(5, factor, mode=mode)(x) for mode in UPSAMPLE_MODES}
    for mode, y in outs.items():
        assert y.shape == (2, 5, 5 * factor, 4 * factor), mode
        torch.testing.assert_close(y, outs["bilinear"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # each class on its own: no mixing between channels
        alone = Upsample(1, factor, mode="deconv")(x[:, 1:2])[:, 0]
    torch.testing.assert_close(outs["deconv"][:, 1], alone, atol=1e-6, rtol=1e-6)


def test_learnable_is_a_constructor_argument():
    assert all(p.requires_grad for p in Upsample(3, 2, "deconv").parameters())
    assert not any(p.requires_grad for p in Upsample(3, 2, "deconv", learnable=False).parameters())
    assert list(Upsample(3, 2, "bilinear").parameters()) == []
    rc = Upsample(3, 2, "resize_conv")
    assert [n for n, p in rc.named_parameters() if p.requires_grad] == ["conv.weight", "conv.bias"]
    assert not any(p.requires_grad for p in Upsample(3, 2, "resize_conv", learnable=False).parameters())


def test_geometry_is_the_same_in_every_mode():
    geo = Geometry(32.0, -84.0)
    maps = {Upsample(2, 16, mode).geometry(geo) for mode in UPSAMPLE_MODES}
    assert maps == {Geometry(2.0, -84.0 - 32 * 15.5 / 16)}


def test_unknown_mode_and_oversized_deconv_are_refused():
    with pytest.raises(ValueError, match="valid modes: deconv, bilinear, resize_conv"):
        Upsample(3, 2, mode="nearest")
    with pytest.raises(ValueError, match="upsample='bilinear'"):
        Upsample(1000, 32, mode="deconv")
    assert Upsample(1000, 32, mode="bilinear").kernel.shape == (1000, 1, 64, 64)
