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

    #: channels of the features the ImageNet classifier's head reads (what fc6 convolutionalizes)
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


def out_channels(module: nn.Module) -> int:
    """Channels a module's output has, read from its layers (never typed in): the last convolution or
    normalisation in registration order; an Inception block concatenates its branches."""
    branches = [getattr(module, f"branch{i}", None) for i in range(1, 5)]
    if all(isinstance(b, nn.Module) for b in branches):  # torchvision Inception: the branches are concatenated
        return sum(out_channels(b) for b in branches)
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    for child in reversed(list(module.children())):
        try:
            return out_channels(child)
        except ValueError:
            continue
    raise ValueError(f"{type(module).__name__} has no layer that sets its output channels")


def _stage_channels(modules: Sequence[nn.Module]) -> int:
    return out_channels(nn.Sequential(*modules))


class VGG16Backbone(Backbone):
    """VGG16 conv1_1..pool5 as in the paper: conv1_1 padded by 100 pixels, ceil-mode pooling.

    ``self.features`` keeps torchvision's layout (``features.0`` ... ``features.30``), so a
    torchvision VGG16 state dict loads as is. ``state``: a torchvision VGG16 state dict (ImageNet weights).
    """

    def __init__(self, state: dict[str, torch.Tensor] | None = None, pad: int = 100):
        super().__init__()
        from torchvision.models import vgg16

        net = vgg16(weights=None)
        if state is not None:
            net.load_state_dict(state)
        feats = net.features
        feats[0].padding = (pad, pad)
        pools = [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        for i in pools:
            feats[i].ceil_mode = True
        self.features = feats
        self.cuts = {8: pools[2] + 1, 16: pools[3] + 1, 32: pools[4] + 1}  # after pool3, pool4, pool5
        self.classifier_in = _stage_channels(list(feats))
        start = 0
        stages = []
        for stride, end in self.cuts.items():
            stages.append((stride, list(feats[start:end]), _stage_channels(list(feats[:end]))))
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
    """AlexNet conv1..pool5 (stride 32), conv1 padded by 100 as in the paper's FCN-AlexNet.
    ``state``: a torchvision AlexNet state dict (ImageNet weights)."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None, pad: int = 100):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)
        if state is not None:
            net.load_state_dict(state)
        net.features[0].padding = (pad, pad)
        for m in net.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.features = net.features
        self.classifier_in = _stage_channels(list(self.features))
        self._declare([(32, list(self.features), self.classifier_in)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {32: self.features(x)}  # pool5: 1/32


class GoogLeNetBackbone(Backbone):
    """GoogLeNet up to inception5b (stride 32); the final average pooling is dropped, as the paper does.
    conv1 is padded by 100 like the VGG and AlexNet nets. Strides 8 and 16 (inception3b, inception4e)
    are exposed for skips. ``state``: a torchvision GoogLeNet state dict (its aux heads are ignored)."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None, pad: int = 100):
        super().__init__()
        from torchvision.models import googlenet

        net = googlenet(weights=None, aux_logits=False, init_weights=state is None, transform_input=False)
        if state is not None:
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith("aux")})
        net.conv1.conv.padding = (pad, pad)  # like conv1_1 in the VGG net: any input size gives an output
        self.stage8 = nn.Sequential(net.conv1, net.maxpool1, net.conv2, net.conv3, net.maxpool2,
                                    net.inception3a, net.inception3b)
        self.stage16 = nn.Sequential(net.maxpool3, net.inception4a, net.inception4b, net.inception4c,
                                     net.inception4d, net.inception4e)
        self.stage32 = nn.Sequential(net.maxpool4, net.inception5a, net.inception5b)
        self.classifier_in = out_channels(self.stage32)
        self._declare([(8, [self.stage8], out_channels(self.stage8)),
                       (16, [self.stage16], out_channels(self.stage16)),
                       (32, [self.stage32], self.classifier_in)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c8 = self.stage8(x)  # 1/8
        c16 = self.stage16(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.stage32(c16)}  # inception5b: 1/32


class ResNetBackbone(Backbone):
    """torchvision ResNet: layer2 (1/8), layer3 (1/16), layer4 (1/32).
    ``state``: a torchvision ResNet state dict of the same depth (ImageNet weights)."""

    def __init__(self, depth: int = 18, state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        import torchvision.models as tvm

        net = getattr(tvm, f"resnet{depth}")(weights=None)
        if state is not None:
            net.load_state_dict(state)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.classifier_in = out_channels(self.layer4)
        self._declare([(8, [self.stem, self.layer2], out_channels(self.layer2)),
                       (16, [self.layer3], out_channels(self.layer3)),
                       (32, [self.layer4], self.classifier_in)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c8 = self.layer2(self.stem(x))  # 1/8
        c16 = self.layer3(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.layer4(c16)}  # 1/32
