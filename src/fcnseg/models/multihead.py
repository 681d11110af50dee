"""The two-headed FCN (paper section 5, SIFT Flow): one trunk, one score-and-fuse head per task, losses summed.

``MultiHeadFCN(backbone, heads={"semantic": 33, "geometric": 3}, skips=(16,))`` shares the backbone
and fc6/fc7 and gives every head its own score layers, skip scorers and upsamplings (each head is an
``FCN`` without a trunk of its own, so its crops and fusion are the FCN's). ``forward`` returns
``{head: (B, K_head, H, W) logits}``; ``multihead_loss`` sums one loss per head; ``head_targets`` splits a stack
of label maps by head. Scoring (``fcnseg.evaluation.loop.evaluate``: one confusion matrix per head) and writing
(``fcnseg.inference.visualize.write_head_masks``) handle a dict of head outputs generically.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import FcnsegError
from ..registry import MULTIHEAD_RECORD_KWARGS, get_builder, register_model, valid_heads
from .backbones import Backbone
from .fcn import FCN


class MultiHeadFCN(nn.Module):
    """One trunk (``backbone`` + fc6/fc7), one FCN head per entry of ``heads`` (name -> class count).

    The other arguments are ``FCN``'s and apply to every head.
    """

    def __init__(self, backbone: Backbone, heads: Mapping[str, int], skips: Sequence[int] = (16,), **fcn_kwargs):
        super().__init__()
        if not heads or any(not isinstance(k, int) or k < 1 for k in heads.values()):
            raise FcnsegError(f"heads must map names to class counts >= 1; got {dict(heads)}")
        built = {name: FCN(backbone, k, skips=skips, **fcn_kwargs) for name, k in heads.items()}
        first = next(iter(built.values()))
        self.backbone, self.fc = backbone, first.fc  # the shared trunk
        for head in built.values():  # a head keeps its scoring, fusion and upsampling only
            del head.backbone
            del head.fc
        self.heads = nn.ModuleDict(built)
        self.head_classes = {name: int(k) for name, k in heads.items()}
        self.num_classes = next(iter(self.head_classes.values()))  # the first head's: a record's num_classes
        self.top_stride = first.top_stride
        self.output_stride = first.output_stride

    @classmethod
    def from_fcn(cls, model: FCN, heads: Mapping[str, int]) -> "MultiHeadFCN":
        """Heads on the trunk of a built single-head ``model`` (e.g. ``build_model("fcn16s_vgg16",
        pretrained=True)``: its ImageNet fc6/fc7 are kept); same skips and upsampling; ``model`` is used up."""
        fc = model.fc
        kwargs = dict(fc_channels=getattr(fc, "out_channels", 0), fc_kernel=getattr(fc, "kernel", 7),
                      skip_scales=model.skip_scales, upsample=getattr(model.final_up, "mode", "deconv"))
        multi = cls(model.backbone, heads, skips=model.skips, **kwargs)
        multi.fc = fc
        return multi

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        feats = self.backbone(x)  # {stride: (B, C, H/stride, W/stride)}
        top = self.fc(feats[self.top_stride])  # shared fc6/fc7 (identity for light backbones)
        return {name: head.logits(head.fuse(feats, top), h, w) for name, head in self.heads.items()}  # (B, K, H, W)


#: the heads of the paper's SIFT Flow net (section 5); the first head is the one a record's num_classes counts
SIFTFLOW_HEADS = {"semantic": 33, "geometric": 3}


def _register_twohead(kind: str, skips: tuple[int, ...]) -> None:
    name = f"fcn{kind}_efficientnet_lite0_twohead"

    def build(num_classes: int = 33, pretrained=False, heads: Mapping[str, int] | None = None,
              upsample: str = "deconv", learnable_upsample: bool = True, dropout: float = 0.5) -> MultiHeadFCN:
        heads = dict(heads) if heads is not None else {"semantic": num_classes, "geometric": 3}
        if not valid_heads(heads):
            raise FcnsegError(f"heads must map 1 to 8 names of [a-z_] (up to 32 characters) to class counts "
                              f"1..65535; got {str(heads)[:120]}")
        first = next(iter(heads.values()))
        if first != num_classes:  # one meaning of num_classes for every model: the (first) head's classes
            raise FcnsegError(f"num_classes={num_classes} but the first head ({next(iter(heads))}) has {first} "
                              f"classes; num_classes is the first head's count")
        single = get_builder(f"fcn{kind}_efficientnet_lite0")(num_classes=first, pretrained=pretrained)
        return MultiHeadFCN(single.backbone, heads, skips=skips, fc_channels=0, upsample=upsample,
                            learnable_upsample=learnable_upsample, dropout=dropout)

    build.__doc__ = (f"FCN-{kind} with one score head per entry of ``heads`` (default: semantic = num_classes, "
                     f"geometric = 3) on one EfficientNet-Lite0 trunk: the paper's two-headed SIFT Flow net, light")
    register_model(name, record_kwargs=MULTIHEAD_RECORD_KWARGS)(build)


_register_twohead("16s", (16,))


def multihead_loss(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   weights: Mapping[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed loss over heads (optionally weighted) and each head's value, for logging."""
    if set(outputs) != set(targets):
        raise FcnsegError(f"targets name heads {sorted(targets)}; the model has {sorted(outputs)}")
    parts = {name: loss_fn(outputs[name], targets[name]) for name in outputs}
    total = sum((weights or {}).get(name, 1.0) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}


def head_targets(masks: torch.Tensor, heads: Sequence[str]) -> dict[str, torch.Tensor]:
    """A (B, n_heads, H, W) mask stack as ``{head: (B, H, W)}``, channel i for ``heads[i]``."""
    if masks.dim() != 4 or masks.shape[1] != len(heads):
        raise FcnsegError(f"the masks have shape {tuple(masks.shape)}; a net with heads {list(heads)} needs "
                          f"(B, {len(heads)}, H, W): one label map per head (e.g. siftflow labels='both')")
    return {name: masks[:, i] for i, name in enumerate(heads)}
