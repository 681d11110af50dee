"""A user's own data: ``images/``, ``masks/`` (same stems, .png), ``classes.txt``, optional ``splits/*.txt``.

``classes.txt`` has one class per line, ``name`` or ``name R G B``; line i (from 0) is raw mask value i.
A line named ``void`` or ``ignore`` marks that value (and colour) as ignored; the other lines are the
network's classes, numbered in order. Masks are single-channel ids (grayscale or palette PNG, 255 =
ignore) or, when classes.txt gives colours, RGB images coloured by the table.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import default_palette
from ..errors import FcnsegError
from .base import (IGNORE_INDEX, SegmentationDataset, check_split, holdout_split, pair_folders, read_list,
                   register_dataset)

IGNORE_NAMES = ("void", "ignore")


def read_classes_txt(path: Path) -> tuple[list[str], list[list[int]] | None]:
    """Class names in line order and their colours (None when the file gives none)."""
    if not path.is_file():
        raise FcnsegError(f"{path}: class list not found; write one class per line as 'name' or 'name R G B'")
    names, colors = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 4 and all(p.lstrip("-").isdigit() for p in parts[-3:]):
            rgb = [int(p) for p in parts[-3:]]
            if not all(0 <= v <= 255 for v in rgb):
                raise FcnsegError(f"{path}:{lineno}: colour values must be 0..255, got {rgb}")
            names.append(" ".join(parts[:-3]))
            colors.append(rgb)
        else:
            names.append(line)
            colors.append(None)
    if not names:
        raise FcnsegError(f"{path}: no classes listed")
    if len(names) > 255:
        raise FcnsegError(f"{path}: {len(names)} lines; at most 255 (value 255 is the ignore index)")
    given = [c is not None for c in colors]
    if any(given) and not all(given):
        missing = given.index(False) + 1
        raise FcnsegError(f"{path}: give a colour on every line or on none (class {missing} has none)")
    return names, (colors if all(given) else None)


@register_dataset("folder")
def folder(root: Path, split: str, transforms=None, skip_bad: bool = False, val_fraction: float = 0.1,
           seed: int = 0) -> SegmentationDataset:
    """Splits come from ``root/splits/{split}.txt``; without a splits folder, ``all`` is every pair and
    ``train``/``val`` hold out ``val_fraction`` of them by ``seed``."""
    names_all, colors_all = read_classes_txt(root / "classes.txt")
    classes, colors, value_map, color_map = [], [], {}, {} if colors_all else None
    palette = default_palette(len(names_all))
    for raw, name in enumerate(names_all):
        cls = IGNORE_INDEX if name.lower() in IGNORE_NAMES else len(classes)
        value_map[raw] = cls
        if color_map is not None:
            color_map[tuple(colors_all[raw])] = cls
        if cls != IGNORE_INDEX:
            classes.append(name)
            colors.append(colors_all[raw] if colors_all else palette[raw])
    files, names, problems = pair_folders(root / "images", root / "masks")
    splits_dir = root / "splits"
    if splits_dir.is_dir():
        check_split("folder", split, sorted(p.stem for p in splits_dir.glob("*.txt")))
        by_name = dict(zip(names, files))
        wanted = read_list(splits_dir / f"{split}.txt")
        # a listed name without an image is a missing partner; unlisted images are simply not in this split
        files = [by_name.get(n, (root / "images" / f"{n}.jpg", root / "masks" / f"{n}.png")) for n in wanted]
        names = wanted
        listed = set(wanted)
        problems = [p for p in problems if Path(p.split(": ", 1)[0]).stem in listed]
    else:
        check_split("folder", split, ("all", "train", "val"))
        if split != "all":
            keep = set(holdout_split(names, split, val_fraction, seed))
            files, names = zip(*[(f, n) for f, n in zip(files, names) if n in keep]) if keep else ([], [])
    return SegmentationDataset(name="folder", root=root, split=split, files=list(files), names=list(names),
                               classes=classes, colors=colors, transforms=transforms, value_map=value_map,
                               color_map=color_map, skip_bad=skip_bad, problems=problems)
