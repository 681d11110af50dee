"""FCN-8s on torchvision ResNets (18, 50): layer2/3/4 as the stride 8/16/32 features."""
from __future__ import annotations

from ..registry import register_model
from .backbones import ResNetBackbone
from .fcn import FCN
from .imagenet import load_imagenet
from .light import SKIPS, light_fcn


def _register_resnet(depth: int, kind: str) -> None:
    name = f"fcn{kind}_resnet{depth}"

    def build(num_classes: int = 21, pretrained=False, **kwargs) -> FCN:
        # without ImageNet weights (every checkpoint load) the ImageNet loader is not consulted
        weights = None if pretrained is None or pretrained is False else load_imagenet(f"resnet{depth}", pretrained)
        return light_fcn(ResNetBackbone(depth, weights.state if weights else None), num_classes, SKIPS[kind], **kwargs)

    build.__doc__ = f"FCN-{kind} on torchvision ResNet-{depth} (torchvision's ImageNet weights when pretrained)."
    register_model(name)(build)


for _d in (18, 50):
    _register_resnet(_d, "8s")
