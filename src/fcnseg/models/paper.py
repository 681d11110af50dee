"""The paper's networks: FCN-32s/16s/8s and FCN-8s at-once on VGG16, FCN-32s on AlexNet and GoogLeNet."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..registry import register_model
from .backbones import AlexNetBackbone, GoogLeNetBackbone, VGG16Backbone
from .fcn import FCN


def _imagenet_weights(arch: str, pretrained):
    """``pretrained``: False/None (random), True or 'imagenet' (torchvision's ImageNet weights,
    downloaded and cached by torchvision), or a local file/state dict of the torchvision classifier."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True or pretrained == "imagenet":
        import torchvision.models as tvm

        enum = {"vgg16": tvm.VGG16_Weights, "alexnet": tvm.AlexNet_Weights, "googlenet": tvm.GoogLeNet_Weights}[arch]
        return enum.IMAGENET1K_V1
    if isinstance(pretrained, (str, Path, dict)):
        return pretrained
    raise TypeError(f"pretrained must be False, True, 'imagenet', a path or a state dict; got {type(pretrained)}")


def _keep_fc8(model: FCN, fc8: dict[str, torch.Tensor]) -> None:
    """Use the ImageNet classifier's last layer as the score layer: a dense 1000-class heat-map net."""
    if model.num_classes != fc8["weight"].shape[0]:
        raise ValueError(f"keep_fc8 needs num_classes={fc8['weight'].shape[0]}, got {model.num_classes}")
    k, c = fc8["weight"].shape
    with torch.no_grad():
        model.score_fr.weight.copy_(fc8["weight"].reshape(k, c, 1, 1))
        model.score_fr.bias.copy_(fc8["bias"])


def _vgg16_fcn(num_classes: int, skips, pretrained=None, keep_fc8: bool = False, skip_scales=None,
               **kwargs) -> FCN:
    backbone = VGG16Backbone(_imagenet_weights("vgg16", pretrained))
    model = FCN(backbone, num_classes, skips=skips, fc_channels=4096, fc_kernel=7, skip_scales=skip_scales, **kwargs)
    if backbone.classifier_state is not None:
        model.fc.load_classifier(backbone.classifier_state, backbone.classifier_in)
        if keep_fc8:
            _keep_fc8(model, {"weight": backbone.classifier_state["6.weight"], "bias": backbone.classifier_state["6.bias"]})
    del backbone.classifier_state
    return model


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
    backbone = AlexNetBackbone(_imagenet_weights("alexnet", pretrained))
    model = FCN(backbone, num_classes, skips=(), fc_channels=4096, fc_kernel=6, **kwargs)
    if backbone.classifier_state is not None:
        state = backbone.classifier_state  # torchvision AlexNet: classifier.1 / .4 / .6
        model.fc.load_classifier({"0.weight": state["1.weight"], "0.bias": state["1.bias"],
                                  "3.weight": state["4.weight"], "3.bias": state["4.bias"]}, backbone.classifier_in)
        if keep_fc8:
            _keep_fc8(model, {"weight": state["6.weight"], "bias": state["6.bias"]})
    del backbone.classifier_state
    return model


@register_model("fcn32s_googlenet")
def fcn32s_googlenet(num_classes: int = 21, pretrained=None, keep_fc8: bool = False, **kwargs) -> FCN:
    """FCN-GoogLeNet (paper Table 1): inception5b scored by a 1x1 convolution, final average pooling dropped."""
    backbone = GoogLeNetBackbone(_imagenet_weights("googlenet", pretrained))
    model = FCN(backbone, num_classes, skips=(), fc_channels=0, **kwargs)
    if backbone.classifier_state is not None and keep_fc8:
        _keep_fc8(model, backbone.classifier_state)
    del backbone.classifier_state
    return model


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
