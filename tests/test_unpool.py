"""Unpooling: switches from the backbone's max poolings put scores back at the argmax positions
(hand-built cases), gradients flow, and FCNs built with upsample='unpool' meet the model contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fcnseg
from fcnseg.models import FCN
from fcnseg.models.backbones import ResNetBackbone
from fcnseg.models.upsample import SwitchMaxPool2d, Unpool, UnpoolDecoder, bilinear_kernel

K = 3


def _identity_fill(unpool: Unpool) -> Unpool:
    with torch.no_grad():
        nn.init.dirac_(unpool.fill.weight)
    return unpool


def test_switches_and_unpooling_by_hand():
    x = torch.tensor([[[[1., 9., 0., 2.],
                        [3., 4., 7., 1.],
                        [0., 0., 5., 0.],
                        [8., 0., 0., 6.]]]])
    pool = SwitchMaxPool2d(2)
    pooled = pool(x)
    assert pooled.flatten().tolist() == [9., 7., 8., 6.]
    indices, size = pool.switches
    assert indices.flatten().tolist() == [1, 6, 12, 15] and tuple(size) == (4, 4)
    scores = torch.tensor([[[[10., 20.], [30., 40.]], [[-1., -2.], [-3., -4.]]]])  # two classes, one switch
    out = _identity_fill(Unpool(2))(scores, indices, size)
    expected = torch.zeros(2, 4, 4)
    for (r, c), (a, b) in zip([(0, 1), (1, 2), (3, 0), (3, 3)], [(10., -1.), (20., -2.), (30., -3.), (40., -4.)]):
        expected[0, r, c], expected[1, r, c] = a, b
    assert torch.equal(out[0], expected)


def test_the_scatter_is_max_unpool_for_distinct_switches_and_keeps_the_larger_for_shared_ones():
    x = torch.randn(2, 5, 12, 14)
    pooled, indices = F.max_pool2d(x, 2, return_indices=True)  # distinct per channel
    assert torch.equal(Unpool.scatter(pooled, indices, (12, 14)), nn.MaxUnpool2d(2)(pooled, indices))
    shared = torch.tensor([[[[5, 5], [0, 15]]]])  # two cells chose pixel 5 of a 4x4 plane
    out = Unpool.scatter(torch.tensor([[[[3., -1.], [2., 4.]]]]), shared, (4, 4)).flatten()
    assert out[5] == 3 and out[0] == 2 and out[15] == 4 and out.count_nonzero() == 3


def test_the_switch_is_where_the_channels_are_strongest_together():
    a = torch.tensor([[5., 0.], [0., 0.]])
    b = torch.tensor([[0., 3.], [0., 4.]])  # channel a alone would pick (0, 0); together (0,1)=3 < (1,1)=4 < 5
    c = torch.tensor([[0., 0.], [0., 2.]])
    pool = SwitchMaxPool2d(2)
    out = pool(torch.stack([a, b, c])[None])
    assert out.flatten().tolist() == [5., 4., 2.]  # the output is the plain per-channel max pooling
    assert pool.switches[0].flatten().tolist() == [3]  # sums: 5, 3, 0, 6


def test_the_switch_counts_negative_responses_by_their_size():
    """Features before a ReLU (or after batch norm) are signed: a strong negative response is strong too."""
    a = torch.tensor([[-6., 1.], [0., 0.]])
    b = torch.tensor([[-2., 1.], [0., 0.]])  # signed sums: -8, 2, 0, 0; sizes: 8, 2, 0, 0
    pool = SwitchMaxPool2d(2)
    pool(torch.stack([a, b])[None])
    assert pool.switches[0].flatten().tolist() == [0]


def test_ceil_mode_and_overlapping_pools_unpool_to_the_input_size():
    for pool in (SwitchMaxPool2d(2, ceil_mode=True), SwitchMaxPool2d(3, 2, 1)):
        x = torch.randn(1, 4, 7, 9)
        pooled = pool(x)
        out = _identity_fill(Unpool(K))(torch.ones(1, K, *pooled.shape[-2:]), *pool.switches)
        assert out.shape == (1, K, 7, 9)
        assert out.sum() <= pooled.shape[-2] * pooled.shape[-1] * K and out.max() == 1


def test_the_fill_starts_as_the_bilinear_kernel_and_learns():
    unpool = Unpool(2)
    impulse = torch.zeros(1, 2, 5, 5)
    impulse[0, 1, 2, 2] = 1
    out = unpool.fill(impulse)
    assert torch.allclose(out[0, 1, 1:4, 1:4], bilinear_kernel(3)) and out[0, 0].abs().sum() == 0
    assert unpool.fill.weight.requires_grad and not Unpool(2, learnable=False).fill.weight.requires_grad


def test_gradients_flow_through_unpooling():
    pool = SwitchMaxPool2d(2)
    x = torch.randn(1, 4, 6, 6)
    pooled = pool(x)
    scores = torch.randn(1, K, *pooled.shape[-2:], requires_grad=True)
    unpool = Unpool(K)
    unpool(scores, *pool.switches).square().sum().backward()
    assert scores.grad.abs().min() > 0  # every score went somewhere
    assert unpool.fill.weight.grad.abs().sum() > 0


def _alexnet():
    return fcnseg.build_model("fcn32s_alexnet", num_classes=K, upsample="unpool")


def _resnet18():
    return FCN(ResNetBackbone(18), K, skips=(), fc_channels=0, upsample="unpool")


@pytest.mark.parametrize("build,poolings", [(_alexnet, 3), (_resnet18, 1)])
def test_unpool_fcn_meets_the_model_contract(build, poolings):
    torch.manual_seed(0)
    model = build()
    assert isinstance(model.final_up, UnpoolDecoder) and len(model.final_up.unpool) == poolings
    nn.init.normal_(model.score_fr.weight, std=0.01)
    model.eval()
    with torch.no_grad():
        for size in [(1, 1), (37, 53), (64, 80)]:
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, K, *size) and torch.isfinite(out).all()
    assert not any(hasattr(m, "switches") for m in model.modules())  # used once, not kept alive
    model.train()
    x = torch.randn(2, 3, 37, 53, requires_grad=True)
    target = torch.randint(0, K, (2, 37, 53))
    F.cross_entropy(model(x), target).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and x.grad.abs().sum() > 0


def test_unpooling_keeps_the_backbone_outputs():
    torch.manual_seed(0)
    plain = FCN(ResNetBackbone(18), K, skips=(), fc_channels=0, upsample="bilinear").eval()
    unpool = FCN(ResNetBackbone(18), K, skips=(), fc_channels=0, upsample="unpool").eval()
    unpool.backbone.load_state_dict(plain.backbone.state_dict())
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        a, b = plain.backbone(x), unpool.backbone(x)
    assert all(torch.equal(a[s], b[s]) for s in a)


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_vgg16_unpool_logits_have_the_input_size():
    model = fcnseg.build_model("fcn32s_vgg16", num_classes=K, upsample="unpool").eval()
    assert len(model.final_up.unpool) == 5 and model.final_up.last is None  # every VGG stride is a pooling
    with torch.no_grad():
        for size in [(1, 1), (37, 53)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, K, *size)


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_checkpoint_round_trip_rebuilds_the_unpool_model(tmp_path):
    from fcnseg.weights.checkpoint import load_checkpoint, make_record, save_checkpoint

    torch.manual_seed(0)
    model = _alexnet().eval()
    nn.init.normal_(model.score_fr.weight, std=0.01)
    path = save_checkpoint(model, tmp_path / "m.safetensors", make_record(model))
    loaded = load_checkpoint(path)
    assert isinstance(loaded.final_up, UnpoolDecoder)
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_unpool_refuses_skips_and_backbones_without_max_pooling():
    with pytest.raises(ValueError, match="skips"):
        FCN(ResNetBackbone(18), K, skips=(16,), fc_channels=0, upsample="unpool")
    pytest.importorskip("timm")
    from fcnseg.models.light import EfficientNetLiteBackbone

    with pytest.raises(ValueError, match="no max pooling"):
        FCN(EfficientNetLiteBackbone(0), K, skips=(), fc_channels=0, upsample="unpool")
