"""The shared contract of every registered model, the paper nets' crop offsets, and staged training.

The contract is parametrised over ``fcnseg.list_models()``, so a model registered later is covered
without touching this file. Each model is built once (a module-scoped parametrised fixture) and
its tests run together, so only one model is alive at a time.
"""
from __future__ import annotations

import math
from contextlib import ExitStack

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fcnseg
from fcnseg.errors import FcnsegError
from fcnseg.models import Backbone, bilinear_kernel, transfer_weights
from fcnseg.models.geometry import Geometry
from fcnseg.registry import register_model, unregister_model

from tiny_models import StridedTinyBackbone, temporarily_registered

NUM_CLASSES = 7
SIZES = [(1, 1), (37, 53), (224, 224), (333, 500)]
# the big trunks (VGG16's 134 M parameters, ResNet-50, GoogLeNet) take seconds per test each: their contract
# runs in the slow group (CI runs both); the fast group keeps the light trunks, which share the same code paths
HEAVY_TRUNKS = ("_vgg16", "_resnet50", "_googlenet")


def _contract_params() -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n.endswith(HEAVY_TRUNKS) else n
            for n in fcnseg.list_models()]


@pytest.fixture(scope="module", params=_contract_params())
def model(request):
    torch.manual_seed(0)
    m = fcnseg.build_model(request.param, num_classes=NUM_CLASSES)
    with torch.no_grad():  # score layers start at zero; give them weights so outputs are not constant
        for name, conv in m.named_modules():
            # a multi-head net's score layers sit under heads.<name>.
            if isinstance(conv, nn.Conv2d) and {"score_fr", "score_skip"} & set(name.split(".")[:3]):
                nn.init.normal_(conv.weight, std=0.01)
    yield m


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_have_the_input_size(model, size):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    if isinstance(out, dict):  # a multi-head net (models.multihead): every head at the input size
        assert {k: tuple(v.shape) for k, v in out.items()} == {k: (1, n, *size) for k, n in model.head_classes.items()}
        assert next(iter(model.head_classes.values())) == NUM_CLASSES
        assert all(torch.isfinite(v).all() for v in out.values())
        return
    assert out.shape == (1, NUM_CLASSES, *size)
    assert torch.isfinite(out).all()


def test_backward_reaches_every_trainable_parameter(model):
    model.train()
    batch = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    x = torch.randn(batch, 3, 37, 53, requires_grad=True)  # batch norm needs more than one value to train
    target = torch.randint(0, NUM_CLASSES, (batch, 37, 53))
    target[0, :5] = 255
    out = model(x)
    if isinstance(out, dict):  # a multi-head net: the heads' losses summed, each head's classes
        loss = sum(F.cross_entropy(v, target.clamp_max(v.shape[1] - 1).masked_fill(target == 255, 255),
                                   ignore_index=255) for v in out.values())
    else:
        loss = F.cross_entropy(out, target, ignore_index=255)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert x.grad.abs().sum() > 0  # the gradient reaches the input, through every layer
    model.zero_grad(set_to_none=True)


def test_declared_strides_and_channels_hold(model):
    backbone = model.backbone
    assert isinstance(backbone, Backbone)
    assert backbone.strides == tuple(sorted(backbone.channels)) and backbone.strides
    assert model.output_stride in backbone.strides
    backbone.eval()
    # adding `delta` input pixels adds delta/s cells at stride s, whatever the padding and rounding
    delta = 2 * max(backbone.strides)
    with torch.no_grad():
        small = backbone(torch.randn(1, 3, 37, 53))
        large = backbone(torch.randn(1, 3, 37 + delta, 53 + 2 * delta))
    assert set(small) == set(backbone.strides)
    for s in backbone.strides:
        assert round(backbone.geometry[s].scale) == s
        assert small[s].shape[1] == large[s].shape[1] == backbone.channels[s], f"stride {s}: channels"
        (h0, w0), (h1, w1) = small[s].shape[-2:], large[s].shape[-2:]
        assert (h1 - h0, w1 - w0) == (delta // s, 2 * delta // s), f"stride {s}: {h0}x{w0} -> {h1}x{w1}"


# Alignment: a feature cell must sit where backbone.geometry says. The check measures it: the centre of
# mass of |d cell / d input|, on the random-init backbone made mirror-symmetric (every convolution kernel
# replaced by the mean of itself and its mirror image), for a random image and its mirror image, in an
# input 2c+1 pixels wide for a cell declared to be centred on pixel c. Strides, paddings and pooling then
# decide alone where the cell sits: when the declaration is right, the network commutes with mirroring
# about c, the two gradients are mirror images of each other and their sum is centred on c exactly; when
# it is wrong, they are not (on the tiny backbones, declarations off by 0.5 / 1 / 4 pixels measure 0.7 to
# 0.9 / 1.0 to 1.4 / 1.8 to 4.2 pixels off).
#
# Tolerance: 0.05 pixel. A right geometry measures within float64 rounding (under 1e-12 pixel on every
# registered backbone; float32 is not enough: GoogLeNet's random-init activations shrink to 1e-11, where
# rounding flips ReLU masks and moves its stride-32 centre by up to 10 pixels), and a half-pixel error
# already measures ten times the tolerance (test_alignment_check_catches_a_wrong_geometry).
ALIGNMENT_TOLERANCE_PX = 0.05


def alignment_errors(backbone: Backbone) -> dict[int, float]:
    """For each stride, |measured - declared| centre of one cell in input pixels (worse of rows and columns).

    The backbone is changed while measuring and restored after (weights, dtype, train/eval mode).
    """
    saved = {k: v.clone() for k, v in backbone.state_dict().items()}
    was_training, dtype = backbone.training, next(backbone.parameters()).dtype
    backbone.eval().double()
    errors = {}
    try:
        with torch.no_grad():
            for m in backbone.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_((m.weight + m.weight.flip(-2, -1)) / 2)
        gen = torch.Generator().manual_seed(0)
        for s in backbone.strides:
            geo = backbone.geometry[s]
            cell = math.ceil((s - geo.offset) / s)  # the first cell centred at least one stride into the image
            centre = geo.scale * cell + geo.offset
            assert (2 * centre).is_integer(), f"stride {s}: centre {centre} is not on a pixel or half-pixel"
            size = int(2 * centre) + 1
            x = torch.randn(1, 3, size, size, generator=gen, dtype=torch.float64)
            x = torch.cat([x, x.flip(-2, -1)]).requires_grad_(True)
            (grad,) = torch.autograd.grad(backbone(x)[s][:, :, cell, cell].sum(), x)
            weight = grad.abs().sum((0, 1))  # (H, W)
            pos = torch.arange(size, dtype=weight.dtype)
            measured = torch.stack([weight.sum(1) @ pos, weight.sum(0) @ pos]) / weight.sum()
            errors[s] = float((measured - centre).abs().max())
    finally:
        backbone.to(dtype)
        backbone.load_state_dict(saved)
        backbone.train(was_training)
    return errors


# identical trunks (the 32s/16s/8s nets of one backbone) are measured once
_MEASURED: dict[tuple, dict[int, float]] = {}


def test_cells_sit_where_the_declared_geometry_says(model):
    backbone = model.backbone
    key = (type(backbone).__name__, tuple((k, tuple(v.shape)) for k, v in backbone.state_dict().items()))
    if key not in _MEASURED:
        _MEASURED[key] = alignment_errors(backbone)
    errors = _MEASURED[key]
    assert set(errors) == set(backbone.strides)
    bad = {s: round(e, 3) for s, e in errors.items() if e > ALIGNMENT_TOLERANCE_PX}
    assert not bad, f"cells off their declared centres by (pixels): {bad}; geometry: {backbone.geometry}"


def test_alignment_check_catches_a_wrong_geometry():
    backbone = StridedTinyBackbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert max(alignment_errors(backbone).values()) < ALIGNMENT_TOLERANCE_PX
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in backbone.state_dict().items())
    backbone.geometry[8] = Geometry(8.0, backbone.geometry[8].offset + 1)  # one pixel off
    errors = alignment_errors(backbone)
    assert errors[8] > 0.5 and errors[16] < ALIGNMENT_TOLERANCE_PX


def test_model_attributes(model):
    assert model.num_classes == NUM_CLASSES
    assert model.arch in fcnseg.list_models() and isinstance(model.build_kwargs, dict)


# ---------------------------------------------------------------- registry

def test_registry():
    names = fcnseg.list_models()
    assert {"fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "fcn8s_atonce_vgg16", "fcn32s_alexnet",
            "fcn32s_googlenet"} <= set(names)
    with pytest.raises(FcnsegError, match="fcn8s_vgg16"):  # one line that lists the valid names
        fcnseg.build_model("fcn8s_vgg61")
    with pytest.raises(ValueError, match="already registered"):
        register_model("fcn8s_vgg16")(lambda **kw: None)


def test_list_models_is_sorted_whatever_the_registration_order():
    order = ["zz_order_test", "aa_order_test", "mm_order_test"]  # registered out of order on purpose
    with ExitStack() as stack:
        for name in order:
            stack.enter_context(temporarily_registered(name, lambda num_classes=3: nn.Conv2d(3, num_classes, 1)))
        listed = [n for n in fcnseg.list_models() if n.endswith("_order_test")]
        assert listed == ["aa_order_test", "mm_order_test", "zz_order_test"]
        assert fcnseg.build_model("mm_order_test", num_classes=4).out_channels == 4
    assert not any(n.endswith("_order_test") for n in fcnseg.list_models())
    with pytest.raises(FcnsegError, match="unknown model 'mm_order_test'"):
        fcnseg.build_model("mm_order_test")


def test_unregister_model_refuses_unknown_names():
    with pytest.raises(FcnsegError, match="unknown model 'fcn8s_vgg61'; valid names: .*fcn8s_vgg16"):
        unregister_model("fcn8s_vgg61")
    assert "fcn8s_vgg16" in fcnseg.list_models()


# ---------------------------------------------------------------- crop offsets

def _meta(name, **kw):
    with torch.device("meta"):  # offsets come from the layers' geometry; no weights needed
        return fcnseg.build_model(name, **kw)


@pytest.mark.parametrize("upsample", ["deconv", "bilinear", "resize_conv"])
def test_crop_offsets_match_the_caffe_reference(upsample):
    """The Caffe reference crops 19 (32s); 5 and 27 (16s); 5, 9 and 31 (8s). fcnseg derives them;
    a negative skip offset means the skip score is the cropped map, as in the reference."""
    assert _meta("fcn32s_vgg16", upsample=upsample).final_offset == 19
    m16 = _meta("fcn16s_vgg16", upsample=upsample)
    assert (m16.skip_offsets, m16.final_offset) == ([-5], 27)
    for name in ("fcn8s_vgg16", "fcn8s_atonce_vgg16"):
        m8 = _meta(name, upsample=upsample)
        assert (m8.skip_offsets, m8.final_offset) == ([-5, -9], 31)


# ---------------------------------------------------------------- staged training

@pytest.fixture(scope="module")
def staged():
    """FCN-32s with random score weights, then FCN-16s from it and FCN-8s from that."""
    torch.manual_seed(0)
    m32 = fcnseg.build_model("fcn32s_vgg16", num_classes=3).eval()
    with torch.no_grad():
        nn.init.normal_(m32.score_fr.weight, std=0.01)
        nn.init.normal_(m32.score_fr.bias)
    m16 = fcnseg.build_model("fcn16s_vgg16", num_classes=3).eval()
    copied16 = transfer_weights(m16, m32)
    m8 = fcnseg.build_model("fcn8s_vgg16", num_classes=3).eval()
    copied8 = transfer_weights(m8, m16)
    return m32, m16, m8, copied16, copied8


@pytest.mark.slow  # three VGG16 nets
def test_transfer_copies_shared_layers_and_keeps_new_ones_fresh(staged):
    m32, m16, m8, copied16, copied8 = staged
    s32, s16, s8 = m32.state_dict(), m16.state_dict(), m8.state_dict()
    assert set(copied16) == {k for k in s32 if not k.startswith("final_up")}  # final_up: 64 -> 32 kernel
    assert set(s16) - set(copied16) == {"up.16.deconv.weight", "score_skip.16.weight", "score_skip.16.bias",
                                        "final_up.deconv.weight"}
    assert all(torch.equal(s16[k], s32[k]) for k in copied16)
    assert set(copied8) == {k for k in s16 if not k.startswith("final_up")}
    assert all(torch.equal(s8[k], s16[k]) for k in copied8)
    for m, new in ((m16, ["16"]), (m8, ["8"])):
        for s in new:
            assert not m.score_skip[s].weight.any() and not m.score_skip[s].bias.any()
            assert torch.equal(m.up[s].deconv.weight[0, 0], bilinear_kernel(4))
        k = m.final_up.kernel_size
        final = m.final_up.deconv.weight
        assert torch.equal(final[1, 1], bilinear_kernel(k)) and not final[0, 1].any()


def _ramp_scores(model, slope=(0.3, 0.7)):
    """Replace score_fr's output by a ramp in cell units (same in every class), to test alignment."""
    def hook(module, inputs, out):
        h, w = out.shape[-2:]
        ramp = slope[0] * torch.arange(h).view(h, 1) + slope[1] * torch.arange(w).view(1, w)
        return ramp.expand_as(out).contiguous()
    return model.score_fr.register_forward_hook(hook)


@pytest.mark.slow  # three VGG16 nets
def test_fused_nets_match_the_coarser_net_at_init(staged):
    """What holds at init, with zero skip scores and bilinear upsampling:

    - exactly, away from a 28-pixel border (where the upsampled maps taper off at their ends): a
      score map that is linear in space comes out the same (both upsamplings reproduce linear
      functions, and the crops put them on the same pixels: a one-pixel misalignment would show
      as a difference of slope/32);
    - approximately, for real score maps: 2x then 16x bilinear is a smoother kernel than one 32x
      step, so FCN-16s at init is a slightly smoothed FCN-32s, not an identical one.
    """
    m32, m16, m8, _, _ = staged
    x = torch.randn(1, 3, 97, 131)
    inner = (..., slice(28, -28), slice(28, -28))
    hooks = [_ramp_scores(m) for m in (m32, m16, m8)]
    try:
        with torch.no_grad():
            r32, r16, r8 = m32(x), m16(x), m8(x)
    finally:
        for h in hooks:
            h.remove()
    dy, dx = r32[inner].diff(dim=-2), r32[inner].diff(dim=-1)  # the ramp comes through: slope / 32 per pixel
    assert torch.allclose(dy, torch.full_like(dy, 0.3 / 32), atol=1e-5)
    assert torch.allclose(dx, torch.full_like(dx, 0.7 / 32), atol=1e-5)
    assert torch.allclose(r16[inner], r32[inner], atol=1e-4) and torch.allclose(r8[inner], r32[inner], atol=1e-4)
    with torch.no_grad():
        y32, y16, y8 = m32(x), m16(x), m8(x)
    spread = (y32[inner] - y32[inner].mean()).abs().max()
    assert (y16 - y32)[inner].abs().max() < 0.5 * spread
    assert (y8 - y16)[inner].abs().max() < 0.5 * spread
