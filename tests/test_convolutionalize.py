"""Convolutionalization: fc layers as convolutions reproduce the classifier; FCNs load ImageNet weights.

Random weights throughout: the claims are about arithmetic, not about what the weights learned.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import fcnseg
from fcnseg.errors import FcnsegError
from fcnseg.models import convolutionalize


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-6)


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_vgg16_at_224_gives_the_classifier_logits(vgg16):
    dense = convolutionalize(vgg16).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = vgg16(x)
        got = dense(x)
    assert got.shape == (2, 1000, 1, 1)
    assert close(got[:, :, 0, 0], want)


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_vgg16_on_a_larger_input_scores_each_7x7_window_of_pool5(vgg16):
    """Each output cell is the classifier head on one 7x7 window of the dense pool5 map (stride 32
    in the input). The windows see their neighbours through VGG's padded 3x3 convolutions, so a
    cell equals the classifier on a 224x224 crop only for a net without padding (next test)."""
    dense = convolutionalize(vgg16).eval()
    x = torch.randn(1, 3, 256, 288)
    with torch.no_grad():
        pool5 = vgg16.features(x)  # (1, 512, 8, 9)
        got = dense[1:](pool5)  # (1, 1000, 2, 3)
        assert got.shape == (1, 1000, 2, 3)
        assert torch.equal(dense(x), got)
        for i in range(2):
            for j in range(3):
                want = vgg16.classifier(pool5[:, :, i:i + 7, j:j + 7].flatten(1))
                assert close(got[:, :, i, j], want), (i, j)


def test_cells_are_the_classifier_on_windows_at_stride_32():
    """A VGG-style classifier without padding: its receptive field is exactly the input it was
    trained on (286 x 286 here), so cell (i, j) of the dense net is the classifier applied to the
    input window at (32 i, 32 j) -- the sliding-window equivalence the paper describes."""
    torch.manual_seed(1)
    layers, c = [], 3
    for width in (8, 16, 32, 64, 512):
        layers += [nn.Conv2d(c, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = width
    clf = torchvision.models.VGG(nn.Sequential(*layers), num_classes=10).eval()
    dense = convolutionalize(clf).eval()
    win = 286  # 7x7 after the five stages
    x = torch.randn(1, 3, win + 32, win + 64)
    with torch.no_grad():
        got = dense(x)
        assert got.shape == (1, 10, 2, 3)
        for i in range(2):
            for j in range(3):
                want = clf(x[:, :, 32 * i:32 * i + win, 32 * j:32 * j + win])
                assert close(got[:, :, i, j], want), (i, j)


def test_alexnet_at_224_gives_the_classifier_logits():
    torch.manual_seed(2)
    clf = torchvision.models.alexnet(weights=None).eval()
    dense = convolutionalize(clf).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert close(dense(x)[:, :, 0, 0], clf(x))
    assert dense[1].kernel_size == (6, 6)


def test_convolutionalize_refuses_other_classifiers():
    clf = nn.Module()
    clf.features = nn.Sequential(nn.Conv2d(3, 4, 3))
    clf.classifier = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="three fully connected layers"):
        convolutionalize(clf)


@pytest.fixture(scope="module")
def vgg16_file(vgg16, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(vgg16.state_dict(), path)
    yield path
    path.unlink()


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_fcn_from_a_torchvision_vgg16_file(vgg16, vgg16_file):
    model = fcnseg.build_model("fcn8s_vgg16", pretrained=str(vgg16_file))
    assert model.build_kwargs == {}  # where the start came from is not a build argument
    tv_convs = [m for m in vgg16.features if isinstance(m, nn.Conv2d)]
    fcn_convs = [m for m in model.backbone.features if isinstance(m, nn.Conv2d)]
    assert len(fcn_convs) == 13
    for a, b in zip(tv_convs, fcn_convs):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    cls = vgg16.classifier
    assert torch.equal(model.fc.fc6.weight, cls[0].weight.reshape(4096, 512, 7, 7))
    assert torch.equal(model.fc.fc6.bias, cls[0].bias)
    assert torch.equal(model.fc.fc7.weight, cls[3].weight.reshape(4096, 4096, 1, 1))
    assert torch.equal(model.fc.fc7.bias, cls[3].bias)
    for conv in (model.score_fr, *model.score_skip.values()):  # new layers start at zero
        assert not conv.weight.any() and not conv.bias.any()


@pytest.mark.slow  # two more VGG16 nets
def test_keep_fc8_scores_the_1000_imagenet_classes(vgg16, vgg16_file):
    with pytest.raises(ValueError, match="upsample='bilinear'"), torch.device("meta"):
        fcnseg.build_model("fcn32s_vgg16", keep_fc8=True, num_classes=1000)  # learned 1000x1000x64x64: 16 GB
    model = fcnseg.build_model("fcn32s_vgg16", pretrained=vgg16_file, keep_fc8=True, num_classes=1000,
                               upsample="bilinear")
    fc8 = vgg16.classifier[6]
    assert torch.equal(model.score_fr.weight, fc8.weight.reshape(1000, 4096, 1, 1))
    assert torch.equal(model.score_fr.bias, fc8.bias)
    with pytest.raises(FcnsegError, match="num_classes=1000"):
        fcnseg.build_model("fcn32s_vgg16", pretrained=vgg16.state_dict(), keep_fc8=True, num_classes=21)
    assert model.build_kwargs == {"upsample": "bilinear"}
