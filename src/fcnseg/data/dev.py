"""The fixed dev splits kept with the package: the part of a training set that recipes and checkpoints are chosen on.

The protocol: train on ``fit`` (the training split less ``dev`` and its guard frames), choose the recipe, the epoch
and the checkpoint by ``dev``, then score ``val`` once and report it. ``val`` never steers a choice, so its figure
is not selection-biased. The lists live in ``data/lists/``; their digests go into the weights' record.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import FcnsegError
from .base import read_list

LISTS = Path(__file__).with_name("lists")
# the families that ship a dev list, and which of their splits it is carved from
DEV_SOURCES = {"camvid": "train", "siftflow": "train"}


def _list_path(dataset: str, kind: str) -> Path:
    if dataset not in DEV_SOURCES:
        raise FcnsegError(f"{dataset} has no shipped dev split; datasets with one: {', '.join(sorted(DEV_SOURCES))}")
    return LISTS / f"{dataset}_{kind}.txt"


def dev_names(dataset: str) -> list[str]:
    """The names of ``dataset``'s dev split, in the shipped order."""
    return read_list(_list_path(dataset, "dev"))


def guard_names(dataset: str) -> list[str]:
    """Training samples next to a dev stretch (CamVid's neighbouring frames), kept out of both dev and fit."""
    path = _list_path(dataset, "guard")
    return read_list(path) if path.is_file() else []


def carve(dataset: str, split: str, names: list[str]) -> list[str]:
    """``names`` of the dev source split narrowed to ``split``: 'dev' keeps the dev list, 'fit' drops dev and guard.

    Every dev name must be in the source split: a dev list that no longer matches the data is refused rather than
    silently shrunk (a renamed file or another holdout seed would move samples between dev and val).
    """
    dev = dev_names(dataset)
    present = set(names)
    missing = [n for n in dev if n not in present]
    if missing:
        raise FcnsegError(f"{dataset}: {len(missing)} of the {len(dev)} dev samples (e.g. {missing[0]!r}) are not in "
                          f"its {DEV_SOURCES[dataset]!r} split here; the dev list needs the standard layout "
                          f"(and for siftflow the default val_fraction 0.1 and seed 0)")
    if split == "dev":
        return dev
    if split == "fit":
        drop = set(dev) | set(guard_names(dataset))
        return [n for n in names if n not in drop]
    raise FcnsegError(f"carve: split must be 'dev' or 'fit', got {split!r}")


def split_digests(dataset: str) -> dict[str, str]:
    """SHA-256 of each shipped list of ``dataset`` (for the weights' record: which dev split chose them)."""
    out = {}
    for kind in ("dev", "guard"):
        path = _list_path(dataset, kind)
        if path.is_file():
            out[f"{dataset}_{kind}.txt"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
