"""Backbones: ImageNet classifiers cut into feature maps keyed by output stride.

Every backbone returns ``{stride: tensor}`` and declares ``channels[stride]`` and
``geometry[stride]`` (where its cells sit in input pixels), so heads size and align themselves.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .geometry import Geometry, walk_all


class Backbone(nn.Module):
    """Base class. Subclasses fill ``stages`` (an nn.ModuleDict keyed by str(stride)) in order."""

    #: ImageNet classifier head layers (torchvision names) that an FCN head can convolutionalize
    classifier_in: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.channels: dict[int, int] = {}
        self.geometry: dict[int, Geometry] = {}

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(sorted(self.channels))

    def _declare(self, stages: Sequence[tuple[int, Sequence[nn.Module], int]]) -> None:
        """Walk the stages in order and record each stride's channel count and coordinate map."""
        geo = Geometry()
        for stride, modules, channels in stages:
            geo = walk_all(modules, geo)
            if round(geo.scale) != stride:
                raise AssertionError(f"{type(self).__name__}: stage declared stride {stride}, walked {geo.scale}")
            self.channels[stride] = channels
            self.geometry[stride] = geo


def _load_torchvision(model: nn.Module, weights) -> None:
    """Load ImageNet weights into a torchvision classifier: a path, a state dict, or a torchvision enum."""
    if weights is None:
        return
    from ..checkpoint import read_state_dict

    if isinstance(weights, dict):
        state = weights
    elif hasattr(weights, "get_state_dict"):
        state = weights.get_state_dict(progress=True)
    else:
        state = read_state_dict(weights)
    model.load_state_dict(state)


class VGG16Backbone(Backbone):
    """VGG16 conv1_1..pool5 as in the paper: conv1_1 padded by 100 pixels, ceil-mode pooling.

    ``self.features`` keeps torchvision's layout (``features.0`` ... ``features.30``), so a
    torchvision VGG16 state dict loads as is; ``self.classifier_state`` keeps its fc layers for the head.
    """

    classifier_in = 512

    def __init__(self, weights=None, pad: int = 100):
        super().__init__()
        from torchvision.models import vgg16

        net = vgg16(weights=None)
        _load_torchvision(net, weights)
        self.classifier_state = {k: v for k, v in net.classifier.state_dict().items()} if weights is not None else None
        feats = net.features
        feats[0].padding = (pad, pad)
        for m in feats:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.features = feats
        self.cuts = {8: 17, 16: 24, 32: 31}  # after pool3, pool4, pool5
        start = 0
        stages = []
        for stride, end in self.cuts.items():
            stages.append((stride, list(feats[start:end]), 256 if stride == 8 else 512))
            start = end
        self._declare(stages)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        out, start = {}, 0
        for stride, end in self.cuts.items():
            x = self.features[start:end](x)  # pool3: 1/8, pool4: 1/16, pool5: 1/32
            out[stride] = x
            start = end
        return out


class AlexNetBackbone(Backbone):
    """AlexNet conv1..pool5 (stride 32), conv1 padded by 100 as in the paper's FCN-AlexNet."""

    classifier_in = 256

    def __init__(self, weights=None, pad: int = 100):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)
        _load_torchvision(net, weights)
        self.classifier_state = {k: v for k, v in net.classifier.state_dict().items()} if weights is not None else None
        net.features[0].padding = (pad, pad)
        for m in net.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.features = net.features
        self._declare([(32, list(self.features), 256)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {32: self.features(x)}  # pool5: 1/32


class GoogLeNetBackbone(Backbone):
    """GoogLeNet up to inception5b (stride 32, 1024 channels); the final average pooling is dropped,
    as the paper does. conv1 is padded by 100 like the VGG and AlexNet nets. Strides 8 and 16
    (inception3b, inception4e) are exposed for skips."""

    classifier_in = 1024

    def __init__(self, weights=None, pad: int = 100):
        super().__init__()
        from torchvision.models import googlenet

        net = googlenet(weights=None, aux_logits=False, init_weights=weights is None, transform_input=False)
        if weights is not None:
            from ..checkpoint import read_state_dict

            state = weights.get_state_dict(progress=True) if hasattr(weights, "get_state_dict") else (
                weights if isinstance(weights, dict) else read_state_dict(weights))
            state = {k: v for k, v in state.items() if not k.startswith("aux")}
            net.load_state_dict(state)
            self.classifier_state = {"weight": net.fc.weight.detach(), "bias": net.fc.bias.detach()}
        else:
            self.classifier_state = None
        net.conv1.conv.padding = (pad, pad)  # like conv1_1 in the VGG net: any input size gives an output
        self.stage8 = nn.Sequential(net.conv1, net.maxpool1, net.conv2, net.conv3, net.maxpool2,
                                    net.inception3a, net.inception3b)
        self.stage16 = nn.Sequential(net.maxpool3, net.inception4a, net.inception4b, net.inception4c,
                                     net.inception4d, net.inception4e)
        self.stage32 = nn.Sequential(net.maxpool4, net.inception5a, net.inception5b)
        self._declare([(8, [self.stage8], 480), (16, [self.stage16], 832), (32, [self.stage32], 1024)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c8 = self.stage8(x)  # 1/8
        c16 = self.stage16(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.stage32(c16)}  # inception5b: 1/32


class ResNetBackbone(Backbone):
    """torchvision ResNet: layer2 (1/8), layer3 (1/16), layer4 (1/32)."""

    def __init__(self, depth: int = 18, weights=None):
        super().__init__()
        import torchvision.models as tvm

        net = getattr(tvm, f"resnet{depth}")(weights=None)
        _load_torchvision(net, weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        expansion = 4 if depth >= 50 else 1
        self.classifier_in = 512 * expansion
        self._declare([(8, [self.stem, self.layer2], 128 * expansion),
                       (16, [self.layer3], 256 * expansion),
                       (32, [self.layer4], 512 * expansion)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c8 = self.layer2(self.stem(x))  # 1/8
        c16 = self.layer3(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.layer4(c16)}  # 1/32
