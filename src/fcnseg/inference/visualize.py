"""Pictures of predictions and the files they go into: palette PNGs of class ids (one per head for a multi-head
net), colour overlays, a legend of class colours, and ``PredictionFiles``, the group of files ``fcnseg predict``
writes for one image (mask, overlay, uncertainty, probabilities), shared by both of its engines."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import FcnsegError
from . import uncertainty as unc
from .options import class_ids
from .segmenter import Prediction


def palette_image(mask: np.ndarray, colors: np.ndarray) -> Image.Image:
    """A mode-'P' image whose pixel values are the class ids and whose palette is ``colors``.

    Reading it back with ``np.asarray(Image.open(path))`` gives the class ids unchanged.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if len(colors) > 256 or (mask.size and int(mask.max()) > 255):
        raise ValueError("a palette PNG holds at most 256 classes")
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(colors)] = colors
    im.putpalette(pal.reshape(-1).tolist())
    return im


def colorize(mask: np.ndarray, colors: Sequence[Sequence[int]] | np.ndarray,
             ignore_index: int | None = 255) -> np.ndarray:
    """(H, W, 3) uint8 RGB picture of a class-id mask; ``ignore_index`` pixels are black (``None``: no
    ignored id, for predictions of up to 256 classes), as are ids without a colour."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(colors) > 256:
        raise ValueError("colorize draws at most 256 classes")
    lut[: len(colors)] = colors
    if ignore_index is not None:
        lut[ignore_index] = 0
    return lut[np.clip(np.asarray(mask), 0, 255).astype(np.uint8)]


def overlay(image: Image.Image | np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with each pixel's class colour blended over it (``alpha`` = weight of the colour)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.shape[:2] != np.asarray(mask).shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {np.asarray(mask).shape} differ in size")
    blend = (1 - alpha) * rgb + alpha * colorize(mask, colors, ignore_index=None).astype(np.float32)
    return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))


def legend(classes: Sequence[str], colors: np.ndarray, swatch: int = 20, width: int = 240) -> Image.Image:
    """One row per class: a colour swatch and "id: name", on white, at least ``width`` wide."""
    font = ImageFont.load_default()
    pad = 4
    row = swatch + pad
    labels = [f"{i}: {name}" for i, name in enumerate(classes)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([width] + [int(measure.textlength(t, font=font)) + 3 * pad + swatch for t in labels])
    im = Image.new("RGB", (width, pad + row * len(classes)), "white")
    draw = ImageDraw.Draw(im)
    for i, (label, color) in enumerate(zip(labels, colors)):
        y = pad + i * row
        draw.rectangle([pad, y, pad + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in color), outline="black")
        draw.text((2 * pad + swatch, y + swatch // 2), label, fill="black", font=font, anchor="lm")
    return im


def write_head_masks(logits: Mapping[str, torch.Tensor], colors: Mapping[str, Sequence[Sequence[int]]],
                     out: str | Path, stem: str, overwrite: bool = False) -> list[Path]:
    """One palette PNG of class ids per head, ``out/<stem>_<head>.png``, from one image's
    ``{head: (K, H, W) or (1, K, H, W) logits}``; written all-or-nothing (``fcnseg.files.write_group``: an existing
    file is an ``OutputExistsError`` unless ``overwrite``). Returns the paths."""
    from ..files import write_group

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    group = []
    for name, value in logits.items():
        if name not in colors:
            raise FcnsegError(f"no colours for head {name!r}; colours are given for {sorted(colors)}")
        mask = class_ids(value if value.dim() == 4 else value[None])[0].cpu().numpy()  # the one argmax
        image = palette_image(mask, colors[name])
        group.append((out / f"{stem}_{name}.png", lambda tmp, image=image: image.save(tmp, format="PNG")))
    return write_group(group, overwrite=overwrite)


@dataclass(frozen=True)
class PredictionFiles:
    """Which files one image gets: always ``<stem>.png`` (palette PNG of class ids), and on request
    ``<stem>_overlay.jpg``, ``<stem>_uncertainty.png`` and ``<stem>_probs.npy``."""

    overlay: bool = False
    alpha: float = 0.5
    probs: bool = False
    uncertainty: bool = False

    @property
    def needs_probs(self) -> bool:
        return self.probs or self.uncertainty

    def names(self, stem: str) -> list[str]:
        return [f"{stem}.png"] + ([f"{stem}_overlay.jpg"] if self.overlay else []) + \
            ([f"{stem}_probs.npy"] if self.probs else []) + ([f"{stem}_uncertainty.png"] if self.uncertainty else [])

    def group(self, out: Path, stem: str, image: Image.Image, pred: Prediction, colors: Sequence[Sequence[int]],
              uncertainty: torch.Tensor | None = None) -> list[tuple[Path, Callable[[str], Any]]]:
        """(path, writer) pairs for ``files.write_group``, in the order of ``names``. ``uncertainty``: the map
        when the caller has computed it already (predict averages it), else it is computed from ``pred.probs``."""
        mask = pred.mask.numpy()
        group: list[tuple[Path, Callable[[str], Any]]] = [
            (out / f"{stem}.png", lambda tmp: palette_image(mask, colors).save(tmp, format="PNG"))]
        if self.overlay:
            pic = overlay(image, mask, colors, self.alpha)
            group.append((out / f"{stem}_overlay.jpg", lambda tmp: pic.save(tmp, format="JPEG", quality=90)))
        if self.probs:
            probs = pred.probs.numpy()

            def save_npy(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, probs)

            group.append((out / f"{stem}_probs.npy", save_npy))
        if self.uncertainty:
            u = unc.to_png_array(unc.uncertainty(pred.probs) if uncertainty is None else uncertainty)  # uint8 (H, W)
            group.append((out / f"{stem}_uncertainty.png", lambda tmp: Image.fromarray(u).save(tmp, format="PNG")))
        return group
