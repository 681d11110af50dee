"""Inference: ``Segmenter`` turns images into class masks (tiled for large images, with optional
test-time augmentation), running an optimized copy of the model (``fcnseg.inference.optimize``).

    seg = Segmenter.from_checkpoint("camvid")
    mask = seg(image)              # PIL image, (H, W, 3) array or (3, H, W) tensor -> (H, W) class ids
    masks = seg([im1, im2])        # a list in, a list out (same-sized images run as one batch)

Large images are cut into overlapping tiles (``fcnseg.inference.options.tile_spans``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..weights.catalog import Weights
from ..weights.checkpoint import open_model
from ..errors import FcnsegError
from ..record import PairedTransform, class_colors, normalization_of, refuse_multihead
from ..hardware import parse_dtype
from .optimize import copy_model, optimize
from .options import TTA, UNSET, Resize, Tiling, class_ids, grouped_options, tile_spans, tta_probabilities

__all__ = ["ImageLike", "Prediction", "Segmenter"]

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

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


@dataclass
class Prediction:
    """One image's result: class ids (H, W) and, when asked for, probabilities (K, H, W) float16."""

    mask: torch.Tensor
    probs: torch.Tensor | None = None


class Segmenter:
    """Images in, class masks out, for any model that maps (B, 3, H, W) to (B, K, H, W) logits, or for typed
    weights (``Segmenter(fcnseg.get_weights("camvid"))``).

    ``classes``, ``colors``, ``mean`` and ``std`` default to the model's checkpoint record. ``dtype``
    and ``channels_last`` go to ``optimize``: the Segmenter runs an optimized copy (batch norm folded,
    weights cast) and leaves the caller's model as it was; ``inplace=True`` converts the model itself
    instead, saving a copy when the caller has no further use for it.

    The other options come in three groups, each a small checked value (``fcnseg.Tiling``, ``fcnseg.TTA``,
    ``fcnseg.Resize``): ``tiling`` (images larger than ``tile`` on a side are cut into tiles sharing
    ``overlap`` pixels; ``batch_size`` same-sized images at a time), ``tta`` (``flip`` and ``scales``:
    probabilities averaged over horizontal flips and input rescalings) and ``resize`` (photos larger than
    the model's working scale are shrunk to it first: ``max_side="auto"``, the long side of the record's
    ``working_size`` or of the built-in family's training images; a number of pixels; 0 or None: never; or
    a fixed ``scale``; masks come back at the photo's size). The flat keywords ``tile``, ``overlap``,
    ``batch_size``, ``flip``, ``scales``, ``max_side`` and ``scale`` build the same objects.
    """

    def __init__(self, model: "nn.Module | Callable[[torch.Tensor], torch.Tensor] | Weights", classes: Sequence[str] | None = None,
                 colors: Sequence[Sequence[int]] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, channels_last: bool = True, tiling: Tiling | None = None,
                 tta: TTA | None = None, resize: Resize | None = None, inplace: bool = False,
                 tile: int = UNSET, overlap: int = UNSET, batch_size: int = UNSET, flip: bool = UNSET,
                 scales: Sequence[float] = UNSET, max_side: int | str | None = UNSET, scale: float | None = UNSET):
        tiling, tta, resize = grouped_options(tiling, tta, resize, tile=tile, overlap=overlap, batch_size=batch_size,
                                              flip=flip, scales=scales, max_side=max_side, scale=scale)
        if isinstance(model, Weights):  # typed weights: loaded here, so ours to convert in place
            model, inplace = model.load(device), True
        refuse_multihead(model, "Segmenter")
        record: Mapping[str, Any] = getattr(model, "record", None) or {}
        self.num_classes = int(getattr(model, "num_classes", 0) or record.get("num_classes", 0))
        if not self.num_classes:
            raise FcnsegError("the model does not say how many classes it has (no .num_classes or record)")
        self.classes = list(classes or record.get("classes") or [f"class_{i}" for i in range(self.num_classes)])
        self.colors = class_colors(colors or record.get("colors"), self.num_classes)
        self.device = torch.device(device)
        own_mean, own_std = normalization_of(model)
        mean, std = own_mean if mean is None else mean, own_std if std is None else std
        self.preprocess = PairedTransform([], None, mean, std)  # the record's own (CheckpointRecord.transforms())
        if isinstance(model, nn.Module):
            if not inplace:
                model = copy_model(model)  # the caller's model stays as it was
            model = optimize(model.to(self.device), dtype, channels_last, inplace=True)
        elif parse_dtype(dtype) != torch.float32:
            raise FcnsegError("dtype converts PyTorch models only; a runtime computes in the precision it was opened "
                              "in (open_model(..., dtype=...), or Segmenter.from_checkpoint with dtype)")
        self.model = model
        self.record = record
        self.align = int(getattr(model, "top_stride", 32))
        self.tiling, self.tta, self.resize = tiling, tta, resize
        self.tile, self.overlap, self.batch_size = tiling.tile, tiling.overlap, tiling.batch_size
        self.flip, self.scales = tta.flip, tta.scales
        self.mask_dtype = torch.uint8 if self.num_classes <= 256 else torch.int32
        max_side = working_long_side(record) if resize.max_side == "auto" else resize.max_side
        self.scale, self.max_side = resize.scale, (int(max_side) if max_side else None)

    @classmethod
    def from_checkpoint(cls, path_or_name: str | Path, *, backend: str | None = None, device: str = "cpu",
                        **kwargs: Any) -> "Segmenter":
        """A Segmenter for a checkpoint (a built-in name, a .safetensors file or a run directory), or for
        an exported ``.onnx`` file run by ONNX Runtime (``backend="onnxruntime"``, implied by the suffix) or
        OpenVINO (``backend="openvino"``; ``dtype="bfloat16"`` opens it in its bf16 inference precision)."""
        model = open_model(path_or_name, backend=backend, device=device, dtype=kwargs.get("dtype"))
        if isinstance(model, nn.Module):  # the freshly loaded model is ours: converting it in place saves a copy
            return cls(model, device=device, inplace=True, **kwargs)
        kwargs.pop("dtype", None)  # the runtime was opened in it
        return cls(model, **kwargs)

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
        return self.preprocess.batch(x.to(self.device, non_blocking=True))

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
                masks[:, y0:y1, x0:x1] = class_ids(core).to(self.mask_dtype).cpu()
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
        of rows before the argmax (smoother edges than enlarging the mask; memory bounded by the band).

        A photo is shrunk with an antialiased bicubic filter (Pillow's BICUBIC), clamped to the photo's own
        range: the antialiased bilinear (triangle) filter blurs more, and the net, trained on sharp frames,
        loses for it (36 CamVid dev frames as 4000 x 3000 photos: 64.29 mean IU against 63.91, the frames at
        their own size 65.26; ``benchmarks/big_photo.py``, docs/results.md). Enlarging stays bilinear."""
        b, _, h, w = raw.shape
        x = raw.float() / 255 if raw.dtype == torch.uint8 else raw.float()
        if size[0] < h or size[1] < w:  # shrinking: antialias, or fine detail aliases
            low, high = torch.aminmax(x)
            small = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            small = small.clamp_(low, high)  # bicubic overshoots at edges
        else:
            small = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
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
            masks[:, r0:r1] = class_ids(band).to(self.mask_dtype)
            if probas is not None:
                probas[:, :, r0:r1] = band.half()
        return masks, probas


# The image size each built-in family's models were trained at (their provenance names the dataset):
# CamVid frames 360 x 480, SIFT Flow images 256 x 256. A record may carry its own "working_size": [H, W].
TRAINING_SIZES = {"camvid": (360, 480), "siftflow": (256, 256)}


def working_long_side(record: Mapping[str, Any]) -> int | None:
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
