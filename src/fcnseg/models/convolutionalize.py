"""Convolutionalization: fully connected layers of an ImageNet classifier become convolutions."""
from __future__ import annotations

import torch
import torch.nn as nn


def fc_to_conv(linear: nn.Linear | dict, in_channels: int, kernel: int) -> nn.Conv2d:
    """A Linear(in_channels*kernel*kernel -> out) as an equivalent kernel x kernel convolution.

    torchvision flattens (C, H, W) in that order, so the weight reshapes directly:
    fc6 of VGG16 (4096 x 25088) becomes 4096 x 512 x 7 x 7.
    """
    weight, bias = (linear["weight"], linear["bias"]) if isinstance(linear, dict) else (linear.weight, linear.bias)
    out_features, in_features = weight.shape
    if in_features != in_channels * kernel * kernel:
        raise ValueError(f"fc layer has {in_features} inputs; expected {in_channels} x {kernel} x {kernel}")
    conv = nn.Conv2d(in_channels, out_features, kernel)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(out_features, in_channels, kernel, kernel))
        conv.bias.copy_(bias)
    return conv


def convolutionalize(classifier: nn.Module) -> nn.Sequential:
    """Turn a torchvision VGG or AlexNet classifier into a dense ImageNet heat-map net.

    The result has the same weights; on a 224 x 224 input its single output cell equals the
    classifier's logits, and on larger inputs each cell is the classifier on one 224 x 224 window
    (stride 32). The adaptive average pooling is dropped: it is the identity at 224 x 224.
    """
    linears = [m for m in classifier.classifier if isinstance(m, nn.Linear)]
    if len(linears) != 3:
        raise ValueError("expected a classifier with three fully connected layers (VGG or AlexNet)")
    first = linears[0]
    channels = [m for m in classifier.features if isinstance(m, nn.Conv2d)][-1].out_channels
    kernel = round((first.in_features / channels) ** 0.5)
    layers: list[nn.Module] = [classifier.features, fc_to_conv(first, channels, kernel), nn.ReLU(inplace=True)]
    layers += [fc_to_conv(linears[1], linears[1].in_features, 1), nn.ReLU(inplace=True)]
    layers += [fc_to_conv(linears[2], linears[2].in_features, 1)]
    return nn.Sequential(*layers)
