"""Inference: ``Segmenter`` turns images into class masks (tiled for large images, with optional
test-time augmentation), and ``optimize`` prepares a model for fast, lean inference.

    seg = Segmenter.from_checkpoint("camvid")
    mask = seg(image)              # PIL image, (H, W, 3) array or (3, H, W) tensor -> (H, W) class ids
    masks = seg([im1, im2])        # a list in, a list out (same-sized images run as one batch)

Large images are cut into overlapping tiles whose origins sit on the network's total stride, and each
output pixel is taken from the tile where it lies farthest from a tile edge. For a fully convolutional
net this equals untiled prediction wherever a tile's margin covers the receptive field; memory is
bounded by the tile size, not the image size.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .checkpoint import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint
from .errors import FcnsegError
from .visualize import class_colors

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise FcnsegError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}") from None


# ---------------------------------------------------------------------------------------------------
# optimize: the same network, converted for inference

# FCN parts that work on K class channels: they cost almost nothing, and rounding their inputs or
# outputs to 16 bits is what flips pixels whose two best classes are nearly tied
_FCN_FLOAT32_PARTS = ("score_fr", "score_skip", "up", "final_up")


class _BigWeightConv2d(nn.Conv2d):
    """A Conv2d with a big weight and few output positions (fc6 and fc7 of the VGG nets), computed
    without oneDNN's per-call copy of the whole weight into its blocked layout (205 MB for fc6 in
    bfloat16, the largest allocation of the forward pass, and slow on a 16 x 16 output).

    16-bit weights: one matrix product of the unfolded input with the weight read in place, in bands
    of output rows that keep the unfolded input under ``chunk_bytes`` (bf16 GEMM runs about twice as
    fast as the convolution here). float32 (where the GEMM is no faster): the convolution in chunks of
    output channels of at most ``chunk_bytes`` of weight each, which bounds the copy. Same parameters,
    same state dict, same arithmetic (float32 accumulation).
    """

    chunk_bytes: int = 64 << 20

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


class _FoldedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d whose affine transform now lives in the convolution before it: only what follows
    the normalisation is left (timm's BatchNormAct2d keeps its dropout and activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("drop", "act"):
            layer = getattr(self, name, None)
            if isinstance(layer, nn.Module):
                x = layer(x)
        return x


def fold_batchnorm(model: nn.Module, check_size: tuple[int, int] = (96, 128)) -> int:
    """Fold every eval-mode BatchNorm2d into the convolution registered just before it in the same
    parent (conv, bn pairs in Sequentials, torchvision and timm blocks); returns how many were folded.

    Registration order is only a convention for data flow, so the result is checked: on a random
    input every folded BatchNorm's output must stay the same, or every fold is undone.
    """
    pairs = []
    for parent in model.modules():
        prev = None
        for child in parent.children():
            if (type(child) is not _FoldedBatchNorm and isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d)
                    and child.track_running_stats and child.running_var is not None
                    and prev.out_channels == child.num_features and not child.training):
                pairs.append((prev, child))
            prev = child
    if not pairs:
        return 0
    # each BatchNorm's own output must stay the same (the model's output may be all zeros: fresh score layers)
    x = torch.randn(1, 3, *check_size, generator=torch.Generator().manual_seed(0))
    outputs: dict[int, list[torch.Tensor]] = {}
    handles = [bn.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, []).append(out.detach().clone()))
               for i, (_, bn) in enumerate(pairs)]
    saved = []
    try:
        with torch.inference_mode():
            model(x)
        with torch.no_grad():
            for conv, bn in pairs:
                saved.append((conv, conv.weight.detach().clone(), conv.bias, bn, bn.__class__))
                inv_std = torch.rsqrt(bn.running_var + bn.eps)
                scale = bn.weight * inv_std if bn.affine else inv_std
                shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
                bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
                conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
                conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)
                bn.__class__ = _FoldedBatchNorm
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    same = all(len(o) == 2 and o[0].shape == o[1].shape
               and torch.allclose(o[1], o[0], rtol=1e-3, atol=1e-4 * float(o[0].abs().max()) + 1e-6)
               for o in (outputs.get(i, []) for i in range(len(pairs))))
    if not same:
        with torch.no_grad():
            for conv, weight, bias, bn, cls in saved:
                conv.weight.copy_(weight)
                conv.bias = bias
                bn.__class__ = cls
        return 0
    return len(pairs)


def _cast_inputs(dtype: torch.dtype, channels_last: bool):
    def hook(module: nn.Module, args: tuple) -> tuple:
        out = []
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                a = a.to(dtype)
                if channels_last and a.dim() == 4:
                    a = a.contiguous(memory_format=torch.channels_last)
            elif isinstance(a, dict):  # backbone features keyed by stride
                a = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for k, v in a.items()}
            out.append(a)
        return tuple(out)

    return hook


def native_bf16_cpu() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU's own units (AVX512-BF16, AMX, or AVX512 at least);
    elsewhere bfloat16 is converted element by element and is slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def bf16_slowness() -> str | None:
    """Why bfloat16 would be slow on this CPU (a sentence for a warning), or None where it is native."""
    if native_bf16_cpu():
        return None
    return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 support: "
            f"bfloat16 will run slower than float32 here")


def optimize(model: nn.Module, dtype: str | torch.dtype | None = None, channels_last: bool = True,
             big_weight_bytes: int = 16 << 20, fold_bn: bool = True) -> nn.Module:
    """Prepare ``model`` for inference, in place, without changing its definition; returns it.

    - eval mode; batch normalisation folded into the convolutions before it (``fold_batchnorm``:
      the model is for inference from then on); channels-last memory format (oneDNN's fast path);
      subnormal floats flushed to zero, process-wide (``torch.set_flush_denormal``): on x86 they
      take a slow path that made a float32 EfficientNet-Lite0 FCN ten times slower here;
    - ``dtype`` (e.g. torch.bfloat16): weights and activations in that type, so the heavy
      convolutions run on the CPU's bf16 units and the weights take half the memory. An FCN's
      scoring and upsampling layers stay float32 (see ``_FCN_FLOAT32_PARTS``); inputs are cast at
      the model's entry and at each float32 part, so callers pass float32 tensors as before;
    - convolutions whose weight exceeds ``big_weight_bytes`` (fc6, fc7 of the VGG nets) avoid oneDNN's
      per-call copy of the whole weight (see ``_BigWeightConv2d``); 0 disables.
    """
    dtype = parse_dtype(dtype)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    slow = bf16_slowness() if dtype == torch.bfloat16 and on_cpu else None
    if slow:
        warnings.warn(slow, RuntimeWarning, stacklevel=2)
    for handle in getattr(model, "_inference_hooks", []):  # optimizing twice replaces the first
        handle.remove()
    hooks = []
    model.eval()
    # x86 computes with subnormal floats tens of times slower; in inference they are noise. (It holds
    # for this thread and OpenMP threads started after it: call optimize before other parallel work.)
    torch.set_flush_denormal(True)
    if fold_bn:
        fold_batchnorm(model)
    if dtype != torch.float32:
        model.to(dtype)
        for name in _FCN_FLOAT32_PARTS:
            part = getattr(model, name, None)
            if not isinstance(part, nn.Module):
                continue
            part.float()
            # containers are never called themselves: hook the layers they hold
            called = part.values() if isinstance(part, nn.ModuleDict) else (
                part if isinstance(part, nn.ModuleList) else [part])
            hooks += [m.register_forward_pre_hook(_cast_inputs(torch.float32, False)) for m in called]
    elif any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    hooks.append(model.register_forward_pre_hook(_cast_inputs(dtype, channels_last)))
    model._inference_hooks = hooks
    if big_weight_bytes:
        for m in model.modules():
            if type(m) is nn.Conv2d and m.weight.numel() * m.weight.element_size() > big_weight_bytes:
                m.__class__ = _BigWeightConv2d
                m.weight.data = m.weight.data.contiguous()  # the GEMM reads it as (O, C*kh*kw)
    model.inference_dtype = dtype
    if dtype != torch.float32:
        _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the float32 weights that a conversion freed back to the OS (glibc keeps freed heap pages)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# ---------------------------------------------------------------------------------------------------
# tiling

def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """Cut ``[0, length)`` into tiles: ``(core_start, core_end, tile_start, tile_end)`` along one axis.

    Cores partition the axis; each tile reaches at least ``overlap / 2`` (rounded up to ``align``)
    past its core on every inner side, so neighbouring tiles share ``overlap`` pixels or more. Tile
    starts are multiples of ``align`` (the network's total stride), so every tile sees the same
    pooling grid as the whole image.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    margin = math.ceil(overlap / 2 / align) * align
    step = (tile - 2 * margin) // align * align
    if step <= 0:
        raise FcnsegError(f"tile size {tile} leaves no room inside an overlap of {overlap} "
                          f"(margins round up to multiples of {align}); use a tile of at least {2 * margin + align}")
    spans = []
    for start in range(0, length, step):
        end = min(start + step, length)
        t0 = max(0, start - margin)
        spans.append((start, end, t0, min(length, t0 + tile)))
    return spans


# ---------------------------------------------------------------------------------------------------
# images in, tensors out

def _to_chw(image: ImageLike) -> torch.Tensor:
    """(3, H, W) tensor, uint8 (0..255) or float (0..1), from any accepted image kind."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise FcnsegError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
        arr = arr[:, :, :3]
        if arr.dtype != np.uint8 and arr.dtype.kind != "f":
            raise FcnsegError(f"image arrays must be uint8 (0..255) or float (0..1), got {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        t = image
        if t.dim() == 2:
            t = t.expand(3, -1, -1)
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise FcnsegError(f"expected a (3, H, W) image tensor, got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8 and not t.is_floating_point():
            raise FcnsegError(f"image tensors must be uint8 (0..255) or float (0..1), got {t.dtype}")
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t
    raise FcnsegError(f"cannot segment a {type(image).__name__}; pass a PIL image, a numpy array or a tensor")


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Test-time scales as a tuple of positive floats, or a one-line error."""
    out = tuple(float(s) for s in scales)
    if not out or any(s <= 0 for s in out):
        raise FcnsegError(f"scales must be positive numbers, got {list(scales)}")
    return out


def tta_probabilities(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class probabilities (B, K, H, W) for normalised images x (B, 3, H, W), averaged over the input
    rescaled by each of ``scales`` and, with ``flip``, its horizontal mirror (test-time augmentation).
    Each pass's softmax is resized back to H x W bilinearly before averaging."""
    h, w = x.shape[-2:]
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    total = None
    for scale, mirrored in passes:
        xi = x if scale == 1.0 else F.interpolate(
            x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", align_corners=False)
        p = logits_fn(xi.flip(-1) if mirrored else xi).float().softmax(1)
        if mirrored:
            p = p.flip(-1)
        if scale != 1.0:
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        total = p if total is None else total.add_(p)
    return total / len(passes)


class TestTimeAugmentation(nn.Module):
    """``model`` under test-time augmentation: forward gives the averaged class probabilities of
    ``tta_probabilities`` (their argmax is the augmented prediction), so it can stand wherever a model's
    logits are only argmax-ed, as in ``engine.evaluate``."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, model: nn.Module, scales: Sequence[float] = (1.0,), flip: bool = False) -> None:
        super().__init__()
        self.model, self.scales, self.flip = model, check_scales(scales), bool(flip)
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_probabilities(self.model, x, self.scales, self.flip)


@dataclass
class Prediction:
    """One image's result: class ids (H, W) and, when asked for, probabilities (K, H, W) float16."""

    mask: torch.Tensor
    probs: torch.Tensor | None = None


class Segmenter:
    """Images in, class masks out, for any model that maps (B, 3, H, W) to (B, K, H, W) logits.

    ``classes``, ``colors``, ``mean`` and ``std`` default to the model's checkpoint record. ``dtype``
    and ``channels_last`` go to ``optimize``, which converts the model in place for inference (batch
    norm folded, weights cast): pass a copy of a model you will train further. Images larger than
    ``tile`` on a side are cut into tiles sharing ``overlap`` pixels. ``flip`` and ``scales`` add
    test-time augmentation: probabilities are averaged over horizontal flips and input rescalings.
    Photos larger than the model's working scale are shrunk to it first (``max_side="auto"``: the long
    side of the record's ``working_size``, or of the built-in family's training images; a number of
    pixels; 0 or None: never), or resized by a fixed ``scale``; masks come back at the photo's size.
    """

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor], classes: Sequence[str] | None = None,
                 colors: Sequence[Sequence[int]] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, channels_last: bool = True, tile: int = 1024,
                 overlap: int = 256, flip: bool = False, scales: Sequence[float] = (1.0,), batch_size: int = 4,
                 max_side: int | str | None = "auto", scale: float | None = None):
        record: dict[str, Any] = dict(getattr(model, "record", None) or {})
        norm = record.get("normalization", {})
        self.num_classes = int(getattr(model, "num_classes", 0) or record.get("num_classes", 0))
        if not self.num_classes:
            raise FcnsegError("the model does not say how many classes it has (no .num_classes or record)")
        self.classes = list(classes or record.get("classes") or [f"class_{i}" for i in range(self.num_classes)])
        self.colors = class_colors(colors or record.get("colors"), self.num_classes)
        self.device = torch.device(device)
        mean = mean if mean is not None else norm.get("mean", IMAGENET_MEAN)
        std = std if std is not None else norm.get("std", IMAGENET_STD)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        if isinstance(model, nn.Module):
            model = optimize(model.to(self.device), dtype, channels_last)
        elif parse_dtype(dtype) != torch.float32:
            raise FcnsegError("dtype applies to PyTorch models only; this backend runs the exported float32 model")
        self.model = model
        self.record = record
        self.align = int(getattr(model, "top_stride", 32))
        self.tile, self.overlap = int(tile), int(overlap)
        self.flip = bool(flip)
        self.scales = check_scales(scales)
        self.batch_size = max(1, int(batch_size))
        self.mask_dtype = torch.uint8 if self.num_classes <= 256 else torch.int32
        if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale <= 16):
            raise FcnsegError(f"scale must be a number in (0, 16], got {scale!r}")
        if max_side == "auto":
            max_side = working_long_side(record)
        elif max_side is not None and (isinstance(max_side, str) or int(max_side) < 0):
            raise FcnsegError(f"max_side must be 'auto', a pixel count or 0 (never shrink), got {max_side!r}")
        self.scale, self.max_side = scale, (int(max_side) if max_side else None)

    @classmethod
    def from_checkpoint(cls, path_or_name: str | Path, *, backend: str | None = None, device: str = "cpu",
                        **kwargs: Any) -> "Segmenter":
        """A Segmenter for a checkpoint (a built-in name, a .safetensors file or a run directory), or for
        an exported ``.onnx`` file run by ONNX Runtime (``backend="onnxruntime"``, implied by the suffix)."""
        is_onnx = str(path_or_name).endswith(".onnx")
        backend = backend or ("onnxruntime" if is_onnx else "torch")
        if backend == "onnxruntime":
            if not is_onnx:
                raise FcnsegError(f"{path_or_name}: the onnxruntime backend runs an exported .onnx model; "
                                  f"make one with 'fcnseg export --format onnx'")
            from .export import OnnxRuntimeModel

            return cls(OnnxRuntimeModel(path_or_name), **kwargs)
        if backend != "torch":
            raise FcnsegError(f"unknown backend {backend!r}; valid: torch, onnxruntime")
        if is_onnx:
            raise FcnsegError(f"{path_or_name}: an ONNX model runs with backend='onnxruntime'")
        return cls(load_checkpoint(path_or_name, device=device), device=device, **kwargs)

    # -- public calls ------------------------------------------------------------------------------

    def __call__(self, images: ImageLike | Sequence[ImageLike]):
        """Class ids for one image or a list of images.

        A PIL image or numpy array gives an (H, W) numpy array (uint8 up to 256 classes); a tensor
        gives an (H, W) int64 tensor, and a (B, 3, H, W) tensor a (B, H, W) one.
        """
        if isinstance(images, (list, tuple)):
            return [self._mask_out(p.mask, im) for p, im in zip(self.predict(images), images)]
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return torch.stack([p.mask.long() for p in self.predict(list(images))])
        return self._mask_out(self.predict([images])[0].mask, images)

    def predict(self, images: Sequence[ImageLike], probs: bool = False) -> list[Prediction]:
        """Masks (and with ``probs`` per-class probabilities) for a list of images, on the CPU.

        Images of the same size that need no tiling run together in batches of ``batch_size``.
        """
        chws = [_to_chw(im) for im in images]
        out: list[Prediction | None] = [None] * len(chws)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(chws):
            size = self._working_size(*t.shape[-2:])
            if size is not None:  # photos away from the training scale: one at a time, resized as a whole
                mask, proba = self._predict_resized(t[None], size, probs)
                out[i] = Prediction(mask[0], proba[0] if proba is not None else None)
                continue
            groups.setdefault(tuple(t.shape[-2:]), []).append(i)
        for (h, w), idx in groups.items():
            step = self.batch_size if (h <= self.tile and w <= self.tile) else 1
            for j in range(0, len(idx), step):
                chunk = idx[j:j + step]
                masks, probas = self._predict_batch(torch.stack([chws[i] for i in chunk]), probs)
                for k, i in enumerate(chunk):
                    out[i] = Prediction(masks[k], probas[k] if probas is not None else None)
        return out  # type: ignore[return-value]

    def segment(self, image: ImageLike, probs: bool = False) -> Prediction:
        """One image: a ``Prediction`` with the (H, W) mask tensor and optional (K, H, W) probabilities."""
        return self.predict([image], probs)[0]

    # -- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _mask_out(mask: torch.Tensor, like: ImageLike):
        return mask.long() if isinstance(like, torch.Tensor) else mask.numpy()

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()

    @torch.inference_mode()
    def _scores(self, x: torch.Tensor, probs: bool) -> torch.Tensor:
        """(B, K, h, w): logits for a single pass, else probabilities averaged over flips and scales."""
        if self.scales == (1.0,) and not self.flip and not probs:
            return self._logits(x)
        return tta_probabilities(self._logits, x, self.scales, self.flip)

    def _predict_batch(self, raw: torch.Tensor, probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """raw (B, 3, H, W) uint8 or float -> masks (B, H, W) and probabilities (B, K, H, W) float16."""
        b, _, h, w = raw.shape
        masks = torch.empty(b, h, w, dtype=self.mask_dtype)
        probas = torch.empty(b, self.num_classes, h, w, dtype=torch.float16) if probs else None
        for y0, y1, ty0, ty1 in tile_spans(h, self.tile, self.overlap, self.align):
            for x0, x1, tx0, tx1 in tile_spans(w, self.tile, self.overlap, self.align):
                scores = self._scores(self._normalize(raw[:, :, ty0:ty1, tx0:tx1]), probs)
                core = scores[:, :, y0 - ty0:y1 - ty0, x0 - tx0:x1 - tx0]
                masks[:, y0:y1, x0:x1] = core.argmax(1).to(self.mask_dtype).cpu()
                if probas is not None:
                    probas[:, :, y0:y1, x0:x1] = core.half().cpu()
        return masks, probas

    # -- working scale: photos of any size ------------------------------------------------------------

    def _working_size(self, h: int, w: int) -> tuple[int, int] | None:
        """The (h, w) to segment an h x w image at, or None to keep it: ``scale`` if given, else the long
        side shrunk to ``max_side`` (never enlarged: a small photo may be a crop at the right scale)."""
        if self.scale is not None:
            s = float(self.scale)
        elif self.max_side and max(h, w) > self.max_side:
            s = self.max_side / max(h, w)
        else:
            return None
        size = (max(1, round(h * s)), max(1, round(w * s)))
        return None if size == (h, w) else size

    def _predict_resized(self, raw: torch.Tensor, size: tuple[int, int], probs: bool,
                         band_bytes: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Segment raw (1, 3, H, W) at ``size``: the whole image is resized before tiling (so tiles see one
        scale and leave no seams), and the class probabilities are resampled bilinearly to H x W in bands
        of rows before the argmax (smoother edges than enlarging the mask; memory bounded by the band)."""
        b, _, h, w = raw.shape
        x = raw.float() / 255 if raw.dtype == torch.uint8 else raw.float()
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=size[0] < h)  # antialias when shrinking, or fine detail aliases
        _, p = self._predict_batch(small, probs=True)  # (B, K, h', w') float16
        p = p.float()
        masks = torch.empty(b, h, w, dtype=self.mask_dtype)
        probas = torch.empty(b, self.num_classes, h, w, dtype=torch.float16) if probs else None
        # output pixel X samples source x = (X + 0.5) * w'/W - 0.5: normalised to (2X + 1)/W - 1 for any w'
        gx = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
        rows = max(1, band_bytes // (4 * w * self.num_classes))
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            gy = (torch.arange(r0, r1, dtype=torch.float32) * 2 + 1) / h - 1
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1).expand(b, -1, -1, -1)
            band = F.grid_sample(p, grid, mode="bilinear", padding_mode="border", align_corners=False)
            masks[:, r0:r1] = band.argmax(1).to(self.mask_dtype)
            if probas is not None:
                probas[:, :, r0:r1] = band.half()
        return masks, probas


# The image size each built-in family's models were trained at (their provenance names the dataset):
# CamVid frames 360 x 480, SIFT Flow images 256 x 256. A record may carry its own "working_size": [H, W].
TRAINING_SIZES = {"camvid": (360, 480), "siftflow": (256, 256)}


def working_long_side(record: dict[str, Any]) -> int | None:
    """The long side, in pixels, of the images a checkpoint was trained on (None when the record cannot say)."""
    size = record.get("working_size")
    if not size:
        prov = record.get("provenance") or {}
        dataset = prov.get("dataset") or (prov.get("config") or {}).get("dataset")
        size = TRAINING_SIZES.get(dataset)
    try:
        return int(max(size)) if size else None
    except (TypeError, ValueError):
        return None
