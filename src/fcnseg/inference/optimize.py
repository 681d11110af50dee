"""Inference conversion: ``optimize`` returns a copy of a model prepared for fast, lean inference.

    fast = optimize(model, "bfloat16")          # a converted copy; ``model`` is left as it was
    optimize(model, inplace=True)               # the same conversion on ``model`` itself

The conversion keeps the network's definition and its state-dict keys: batch normalisation is folded
into the convolution before it (the BatchNorm module is replaced, through its parent, by what follows
the normalisation), weights are cast and stored channels-last, an FCN's class-channel parts stay in
float32, and convolutions with a very big weight are replaced by ``BigWeightConv2d``, which holds the
same parameters.

Process-wide switches are not the library's to flip: they live in ``fcnseg.hardware``, for a program's
entry point.
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FcnsegError
from ..hardware import bf16_slowness, parse_dtype


# FCN parts that work on K class channels: they cost almost nothing, and rounding their inputs or
# outputs to 16 bits is what flips pixels whose two best classes are nearly tied
FCN_FLOAT32_PARTS = ("score_fr", "score_skip", "up", "final_up")


# ---------------------------------------------------------------------------------------------------
# the big-weight convolution

class BigWeightConv2d(nn.Conv2d):
    """A Conv2d with a big weight and few output positions (fc6 and fc7 of the VGG nets), computed
    without oneDNN's per-call copy of the whole weight into its blocked layout (205 MB for fc6 in
    bfloat16, the largest allocation of the forward pass, and slow on a 16 x 16 output).

    16-bit weights: one matrix product of the unfolded input with the weight read in place, in bands
    of output rows that keep the unfolded input under ``chunk_bytes`` (bf16 GEMM runs about twice as
    fast as the convolution here). float32 (where the GEMM is no faster): the convolution in chunks of
    output channels of at most ``chunk_bytes`` of weight each, which bounds the copy. Same parameters,
    same state dict, same arithmetic (float32 accumulation).
    """

    def __init__(self, *args, chunk_bytes: int = 64 << 20, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_bytes = int(chunk_bytes)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, chunk_bytes: int = 64 << 20) -> "BigWeightConv2d":
        """The same convolution, holding ``conv``'s own parameter objects (nothing is copied)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta", chunk_bytes=chunk_bytes)
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def _conv_forward(self, input, weight, bias):  # noqa: A002  (torch's signature)
        if self.padding_mode != "zeros" or self.groups != 1 or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        if weight.dtype in (torch.bfloat16, torch.float16):
            return self._gemm(input, weight, bias)
        per_channel = weight[0].numel() * weight.element_size()
        step = max(1, self.chunk_bytes // per_channel)
        outs = [F.conv2d(input, weight[i:i + step], bias[i:i + step] if bias is not None else None, self.stride,
                         self.padding, self.dilation) for i in range(0, self.out_channels, step)]
        return torch.cat(outs, 1)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel_size, self.stride, self.dilation, self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        b, c, h, w = x.shape
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            return super()._conv_forward(x, weight, bias)  # let torch raise its usual size error
        w2 = weight.reshape(self.out_channels, -1)  # (O, C*kh*kw), the order F.unfold uses
        row_bytes = b * wo * w2.shape[1] * x.element_size()
        rows = max(1, self.chunk_bytes // row_bytes)
        outs = []
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            band = x[:, :, r0 * sh:(r1 - 1) * sh + dh * (kh - 1) + 1]
            cols = F.unfold(band, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # (B, C*kh*kw, rows*Wo)
            outs.append(F.linear(cols.transpose(1, 2), w2, bias).view(b, r1 - r0, wo, self.out_channels))
        return torch.cat(outs, 1).permute(0, 3, 1, 2)  # (B, O, Ho, Wo), channels-last in memory


def _replace_big_convs(model: nn.Module, big_weight_bytes: int) -> int:
    """Replace (through its parent) every plain Conv2d whose weight exceeds ``big_weight_bytes``."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Conv2d and child.weight.numel() * child.weight.element_size() > big_weight_bytes]
    done: dict[int, BigWeightConv2d] = {}  # a convolution registered in two places stays one module
    for parent, name, conv in swaps:
        if id(conv) not in done:
            done[id(conv)] = BigWeightConv2d.from_conv(conv)
        setattr(parent, name, done[id(conv)])
    for m in model.modules():
        if isinstance(m, BigWeightConv2d):  # the GEMM reads the weight as (O, C*kh*kw), not channels-last
            m.weight.data = m.weight.data.contiguous()
    return len(done)


# ---------------------------------------------------------------------------------------------------
# batch normalisation folding

def _after_normalisation(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of ``bn`` once its affine transform lives in the convolution before it: nothing
    (``nn.Identity``), or the dropout and activation that timm's BatchNormAct2d applies after it."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d, nn.BatchNorm2d]]:
    """``(parent, bn_name, conv, bn)`` for every eval-mode BatchNorm2d registered right after a Conv2d
    with as many output channels in the same parent (Sequentials, torchvision and timm blocks)."""
    pairs, seen = [], set()
    for parent in model.modules():
        prev = None
        for name, child in parent.named_children():
            if (isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d) and id(child) not in seen
                    and child.track_running_stats and child.running_var is not None
                    and prev.out_channels == child.num_features and not child.training):
                pairs.append((parent, name, prev, child))
                seen.add(id(child))
            prev = child
    return pairs


def fold_batchnorm(model: nn.Module, check_size: tuple[int, int] = (96, 128)) -> int:
    """Fold, in place, every eval-mode BatchNorm2d into the convolution registered just before it in the
    same parent; the BatchNorm is replaced on its parent by ``nn.Identity`` (or by the dropout and
    activation of timm's BatchNormAct2d). Returns how many were folded.

    Registration order is only a convention for data flow, so the result is checked: on a random
    input every folded BatchNorm's output must stay the same, or every fold is undone. A model that
    is copied first should go through ``optimize``, which folds a copy.
    """
    pairs = _conv_bn_pairs(model)
    if not pairs:
        return 0
    # each BatchNorm's own output must stay the same (the model's output may be all zeros: fresh score layers)
    x = torch.randn(1, 3, *check_size, generator=torch.Generator().manual_seed(0))
    x = x.to(next(model.parameters()).device)
    before: dict[int, list[torch.Tensor]] = {}
    after: dict[int, list[torch.Tensor]] = {}

    def record(store: dict[int, list[torch.Tensor]], i: int):
        return lambda m, a, out: store.setdefault(i, []).append(out.detach().clone())

    handles = [bn.register_forward_hook(record(before, i)) for i, (_, _, _, bn) in enumerate(pairs)]
    saved = []
    try:
        with torch.inference_mode():
            model(x)
        for h in handles:
            h.remove()
        handles = []
        with torch.no_grad():
            for i, (parent, name, conv, bn) in enumerate(pairs):
                saved.append((parent, name, conv, conv.weight.detach().clone(), conv.bias, bn))
                inv_std = torch.rsqrt(bn.running_var + bn.eps)
                scale = bn.weight * inv_std if bn.affine else inv_std
                shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
                bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
                conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
                conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)
                rest = _after_normalisation(bn)
                handles.append(rest.register_forward_hook(record(after, i)))
                setattr(parent, name, rest)
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    same = all(len(b) == len(a) > 0 and all(
        p.shape == q.shape and torch.allclose(q, p, rtol=1e-3, atol=1e-4 * float(p.abs().max()) + 1e-6)
        for p, q in zip(b, a)) for b, a in ((before.get(i, []), after.get(i, [])) for i in range(len(pairs))))
    if not same:
        with torch.no_grad():
            for parent, name, conv, weight, bias, bn in saved:
                conv.weight.copy_(weight)
                conv.bias = bias
                setattr(parent, name, bn)
        return 0
    return len(pairs)


# ---------------------------------------------------------------------------------------------------
# precision

class CastInputs:
    """A forward pre-hook that casts a module's floating-point inputs (and backbone features keyed by
    stride) to ``dtype``, channels-last when asked. A class, so that ``optimize`` can find the hooks it
    set before and replace them rather than stack a second cast after the first."""

    def __init__(self, dtype: torch.dtype, channels_last: bool) -> None:
        self.dtype, self.channels_last = dtype, channels_last

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        out = []
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                a = a.to(self.dtype)
                if self.channels_last and a.dim() == 4:
                    a = a.contiguous(memory_format=torch.channels_last)
            elif isinstance(a, dict):  # backbone features keyed by stride
                a = {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for k, v in a.items()}
            out.append(a)
        return tuple(out)


def _remove_cast_hooks(model: nn.Module) -> None:
    for m in model.modules():
        # _forward_pre_hooks is where nn.Module keeps its pre-hooks; ours are recognised by their class
        for key in [k for k, hook in m._forward_pre_hooks.items() if isinstance(hook, CastInputs)]:
            del m._forward_pre_hooks[key]


def _called_layers(part: nn.Module) -> list[nn.Module]:
    # containers are never called themselves: hook the layers they hold
    if isinstance(part, nn.ModuleDict):
        return list(part.values())
    return list(part) if isinstance(part, nn.ModuleList) else [part]


def _float32_layers(model: nn.Module) -> list[str]:
    """The layers a checkpoint's record says to run in float32 (``float32_layers``), checked: the record
    comes from a file."""
    record = getattr(model, "record", None)
    layers = record.get("float32_layers", []) if hasattr(record, "get") else []
    if not (isinstance(layers, list) and len(layers) <= 10_000 and all(isinstance(n, str) for n in layers)):
        raise FcnsegError("the checkpoint record's float32_layers must be a list of layer names")
    return list(layers)


def _cast_except(model: nn.Module, dtype: torch.dtype, kept: list[nn.Module]) -> None:
    """Cast the floating parameters and buffers of ``model`` to ``dtype``, except those of the ``kept``
    parts: a float32 part keeps its own weights, not their 16-bit rounding (score_fr's bias may be
    large and cancel a large activation)."""
    skip = {id(m) for part in kept for m in part.modules()}
    for m in model.modules():
        if id(m) in skip:
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(m.named_buffers(recurse=False)):
            if b.is_floating_point():
                setattr(m, name, b.to(dtype))


def _keep_in_float32(model: nn.Module, names: list[str], dtype: torch.dtype, channels_last: bool) -> None:
    """Run the named parts of a ``dtype`` model in float32: each part computes in float32 and hands
    float32 on; every other layer with parameters casts its inputs to ``dtype`` itself, so that a
    16-bit layer after a float32 part still gets 16-bit inputs."""
    parts = [model.get_submodule(name) for name in names]  # the names were checked by optimize
    kept = {id(m) for part in parts for m in part.modules()}
    for part in parts:
        part.float()
        for m in _called_layers(part):
            m.register_forward_pre_hook(CastInputs(torch.float32, False))
    fcn_float32 = {id(m) for name in FCN_FLOAT32_PARTS if isinstance(getattr(model, name, None), nn.Module)
                   for m in getattr(model, name).modules()}
    for m in model.modules():
        if (id(m) not in kept and id(m) not in fcn_float32 and m is not model
                and any(True for _ in m.parameters(recurse=False))):
            m.register_forward_pre_hook(CastInputs(dtype, channels_last))


# ---------------------------------------------------------------------------------------------------
# optimize

def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for a conversion that must leave the caller's model alone, or a one-line
    error for a model that cannot be copied (one holding a runtime session, say)."""
    try:
        return copy.deepcopy(model)
    except (TypeError, RuntimeError, copy.Error) as e:
        raise FcnsegError(f"cannot copy this {type(model).__name__} to optimize it ({str(e).splitlines()[0]}); "
                          f"pass inplace=True to convert the model itself") from None


def optimize(model: nn.Module, dtype: str | torch.dtype | None = None, channels_last: bool = True,
             big_weight_bytes: int = 16 << 20, fold_bn: bool = True, *, inplace: bool = False,
             keep_float32: Sequence[str] | None = None) -> nn.Module:
    """A copy of ``model`` prepared for inference (``inplace=True``: ``model`` itself, converted), with
    the same definition and state-dict keys:

    - eval mode; batch normalisation folded into the convolutions before it (``fold_batchnorm``: the
      result is for inference only); channels-last memory format (oneDNN's fast path);
    - ``dtype`` (e.g. torch.bfloat16): weights and activations in that type, so the heavy
      convolutions run on the CPU's bf16 units and the weights take half the memory. An FCN's
      scoring and upsampling layers stay float32 (see ``FCN_FLOAT32_PARTS``); inputs are cast at
      the model's entry and at each float32 part, so callers pass float32 tensors as before;
    - ``keep_float32``: names of further parts (``model.get_submodule`` names, e.g. the layers
      ``fcnseg.evaluation.precision.layer_sensitivity`` finds fragile) that compute in float32 in a 16-bit model;
      their outputs stay float32 and the 16-bit layers after them cast their inputs back. None: the
      ``float32_layers`` of the model's record, if any (``fcnseg export --dtype bfloat16`` writes them);
    - convolutions whose weight exceeds ``big_weight_bytes`` (fc6, fc7 of the VGG nets) are replaced by
      ``BigWeightConv2d``, which avoids oneDNN's per-call copy of the whole weight; 0 disables.

    Nothing process-wide changes; a program may add ``flush_denormal`` (much faster on x86 when
    activations underflow) and, after a bfloat16 conversion, ``return_freed_memory``.
    """
    dtype = parse_dtype(dtype)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    slow = bf16_slowness() if dtype == torch.bfloat16 and on_cpu else None
    if slow:
        warnings.warn(slow, RuntimeWarning, stacklevel=2)
    keep_float32 = _float32_layers(model) if keep_float32 is None else list(keep_float32)
    for name in keep_float32:  # checked before any work, whatever the dtype
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FcnsegError(f"keep_float32: the model has no layer named {name!r}") from None
    if not inplace:
        model = copy_model(model)
    _remove_cast_hooks(model)  # optimizing an optimized model replaces its casts
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
    if dtype != torch.float32:
        heads = [getattr(model, n) for n in FCN_FLOAT32_PARTS if isinstance(getattr(model, n, None), nn.Module)]
        _cast_except(model, dtype, heads + [model.get_submodule(n) for n in keep_float32])
        for part in heads:
            part.float()
            for m in _called_layers(part):
                m.register_forward_pre_hook(CastInputs(torch.float32, False))
    elif any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(CastInputs(dtype, channels_last))
    if big_weight_bytes:
        _replace_big_convs(model, big_weight_bytes)
    if keep_float32 and dtype != torch.float32:  # after the swaps, so the hooks sit on the layers that run
        _keep_in_float32(model, list(keep_float32), dtype, channels_last)
    return model
