"""The paper's networks: FCN-32s/16s/8s and FCN-8s at-once on VGG16, FCN-32s on AlexNet and GoogLeNet."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import FcnsegError
from ..registry import register_model
from .backbones import AlexNetBackbone, GoogLeNetBackbone, VGG16Backbone
from .fcn import FCN, ConvClassifier
from .imagenet import load_imagenet


def _keep_fc8(model: FCN, fc8: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Use the ImageNet classifier's last layer as the score layer: a dense 1000-class heat-map net."""
    if fc8 is None:
        raise FcnsegError("keep_fc8 needs ImageNet weights: pass pretrained=True or a weights file")
    weight, bias = fc8
    if model.num_classes != weight.shape[0]:
        raise FcnsegError(f"keep_fc8 needs num_classes={weight.shape[0]}, got {model.num_classes}")
    k, c = weight.shape
    with torch.no_grad():
        model.score_fr.weight.copy_(weight.reshape(k, c, 1, 1))
        model.score_fr.bias.copy_(bias)


def _paper_fcn(family: str, backbone_cls, num_classes: int, pretrained, keep_fc8: bool, **kwargs) -> FCN:
    """One builder for the paper's nets: ImageNet weights into the trunk, fc6/fc7 convolutionalized
    into the head where the classifier has them, fc8 as the score layer with ``keep_fc8``. Without ImageNet weights
    (``pretrained`` False or None: every checkpoint load) the ImageNet loader is not consulted."""
    weights = None if pretrained is None or pretrained is False else load_imagenet(family, pretrained)
    backbone = backbone_cls(weights.state if weights else None)
    model = FCN(backbone, num_classes, **kwargs)
    if weights is not None and weights.fc6 is not None and isinstance(model.fc, ConvClassifier):
        model.fc.load_classifier(weights.fc6, weights.fc7, backbone.classifier_in)
    if keep_fc8:
        _keep_fc8(model, weights.fc8 if weights else None)
    return model


def _vgg16_fcn(num_classes: int, skips, pretrained=None, keep_fc8: bool = False, **kwargs) -> FCN:
    kwargs.setdefault("fc_channels", 4096)
    kwargs.setdefault("fc_kernel", 7)
    return _paper_fcn("vgg16", VGG16Backbone, num_classes, pretrained, keep_fc8, skips=skips, **kwargs)


@register_model("fcn32s_vgg16")
def fcn32s_vgg16(num_classes: int = 21, **kwargs) -> FCN:
    """FCN-32s: VGG16, fc6/fc7 as convolutions, one 32x upsampling."""
    return _vgg16_fcn(num_classes, (), **kwargs)


@register_model("fcn16s_vgg16")
def fcn16s_vgg16(num_classes: int = 21, **kwargs) -> FCN:
    """FCN-16s: FCN-32s plus a pool4 skip fused at 1/16, then 16x upsampling."""
    return _vgg16_fcn(num_classes, (16,), **kwargs)


@register_model("fcn8s_vgg16")
def fcn8s_vgg16(num_classes: int = 21, **kwargs) -> FCN:
    """FCN-8s: FCN-16s plus a pool3 skip fused at 1/8, then 8x upsampling."""
    return _vgg16_fcn(num_classes, (16, 8), **kwargs)


@register_model("fcn8s_atonce_vgg16")
def fcn8s_atonce_vgg16(num_classes: int = 21, **kwargs) -> FCN:
    """FCN-8s trained in one stage: pool4 scaled by 0.01 and pool3 by 0.0001 before scoring."""
    return _vgg16_fcn(num_classes, (16, 8), skip_scales=(0.01, 0.0001), **kwargs)


@register_model("fcn32s_alexnet")
def fcn32s_alexnet(num_classes: int = 21, pretrained=None, keep_fc8: bool = False, **kwargs) -> FCN:
    """FCN-AlexNet (paper Table 1): conv1 padded by 100, fc6 as a 6x6 convolution, 32x upsampling."""
    kwargs.setdefault("fc_channels", 4096)
    kwargs.setdefault("fc_kernel", 6)
    return _paper_fcn("alexnet", AlexNetBackbone, num_classes, pretrained, keep_fc8, skips=(), **kwargs)


@register_model("fcn32s_googlenet")
def fcn32s_googlenet(num_classes: int = 21, pretrained=None, keep_fc8: bool = False, **kwargs) -> FCN:
    """FCN-GoogLeNet (paper Table 1): inception5b scored by a 1x1 convolution, final average pooling dropped."""
    kwargs.setdefault("fc_channels", 0)
    return _paper_fcn("googlenet", GoogLeNetBackbone, num_classes, pretrained, keep_fc8, skips=(), **kwargs)


def transfer_weights(dst: nn.Module, src: nn.Module) -> list[str]:
    """Staged training: copy every tensor ``dst`` shares with ``src`` by name and shape.

    FCN-16s from a trained FCN-32s keeps the backbone, fc6/fc7 and score_fr, while its new pool4
    scorer stays at zero and its new upsamplings stay bilinear; FCN-8s from FCN-16s likewise.
    Returns the copied names.
    """
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    copied = [k for k, v in dst_state.items() if k in src_state and src_state[k].shape == v.shape]
    with torch.no_grad():
        for k in copied:
            dst_state[k].copy_(src_state[k])
    return copied
