"""The files ``fcnseg predict`` writes for one image (mask, overlay, uncertainty, probabilities), as one group."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .segmenter import Prediction
from . import uncertainty as unc, visualize as vis  # looked up at call time, as the CLI did (tests patch them)


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
            (out / f"{stem}.png", lambda tmp: vis.palette_image(mask, colors).save(tmp, format="PNG"))]
        if self.overlay:
            pic = vis.overlay(image, mask, colors, self.alpha)
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
