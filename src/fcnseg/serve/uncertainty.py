"""Per-pixel uncertainty for the service: normalised entropy of the class probabilities."""
from __future__ import annotations

import math

import numpy as np
import torch


def normalized_entropy_map(probs: torch.Tensor) -> np.ndarray:
    """(H, W) uint8 in 0..255 from (K, H, W) probabilities: entropy / log(K), 0 = certain, 255 = uniform."""
    p = probs.float().clamp_min(1e-12)
    k = p.shape[0]
    if k < 2:
        return np.zeros(p.shape[1:], dtype=np.uint8)
    ent = -(p * p.log()).sum(0) / math.log(k)
    return (ent.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
