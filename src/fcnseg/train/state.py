"""The resume state: one dictionary (model, optimiser, scheduler, scaler, position, RNG states, data order).

Files in ``RUN/checkpoints/``: ``state-last.pt`` and the one before it, ``state-prev.pt``, each
with a ``.sha256`` beside it (a file counts as good when its hash is one of the two recorded). Saving renames last -> prev and then writes the new last atomically,
so a kill at any moment leaves at least one good state. Loading uses ``torch.load(weights_only=True)``
only, checks the hash, and falls back to the previous state when the newest is truncated or damaged.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write, file_digest
from ..errors import FcnsegError

logger = logging.getLogger(__name__)

FORMAT = "fcnseg-train-state/1"
REQUIRED = ("format", "model", "optimizer", "scheduler", "scaler", "epoch", "batch", "step", "rng", "order")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_state(state: dict[str, Any], folder: str | Path) -> Path:
    """Rotate ``state-last.pt`` to ``state-prev.pt`` and write ``state`` as the new last, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    last, prev = folder / "state-last.pt", folder / "state-prev.pt"
    if last.is_file():
        os.replace(last, prev)
        if (folder / "state-last.pt.sha256").is_file():
            os.replace(folder / "state-last.pt.sha256", folder / "state-prev.pt.sha256")
    state = dict(state, format=FORMAT)
    atomic_write(last, lambda tmp: torch.save(state, tmp))
    digest = file_digest(last)
    atomic_write(folder / "state-last.pt.sha256", lambda tmp: Path(tmp).write_text(digest + "\n"))
    return last


def _known_hashes(folder: Path) -> set[str]:
    out = set()
    for name in ("state-last.pt.sha256", "state-prev.pt.sha256"):
        try:
            out.add((folder / name).read_text().strip())
        except OSError:
            pass
    return out


def _load_one(path: Path) -> dict[str, Any]:
    # a kill between the two renames of a rotation leaves a good file beside the other one's hash,
    # so a file is good when its hash is either recorded one
    if file_digest(path) not in _known_hashes(path.parent):
        raise ValueError("its content matches no recorded sha256 (truncated, damaged, or its save was interrupted)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle: all mean "unusable"
        raise ValueError(f"unreadable ({str(e).splitlines()[0][:160]})") from None
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing or state.get("format") != FORMAT:
        raise ValueError(f"not an fcnseg training state (missing {', '.join(missing) or 'format'})")
    return state


def load_state(folder: str | Path) -> tuple[dict[str, Any], Path]:
    """The newest good state in ``folder``; a bad newest one is logged as a warning and skipped."""
    folder = Path(folder)
    problems = []
    for name in ("state-last.pt", "state-prev.pt"):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        try:
            state = _load_one(path)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            logger.warning(f"{path}: {e}; trying the previous state")
            continue
        return state, path
    raise FcnsegError(f"{folder}: no usable training state to resume from ({'; '.join(problems)})")
