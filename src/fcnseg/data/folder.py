"""A user's own data: ``images/``, ``masks/`` (same stems, .png), ``classes.txt``, optional ``splits/*.txt``.

``classes.txt`` has one class per line, ``name`` or ``name R G B``; line i (from 0) is raw mask value i.
A line named ``void`` or ``ignore`` marks that value (and colour) as ignored; the other lines are the
network's classes, numbered in order. A line ``ignore_value: V`` (or the ``ignore_value`` argument)
marks raw value V, beyond the class lines, as not labelled (CamVid-style void 11). Masks are
single-channel ids (grayscale or palette PNG, 255 = ignore) or, when classes.txt gives colours, RGB
images coloured by the table. docs/own-data.md walks through it.
"""
from __future__ import annotations

from pathlib import Path

from ..record import default_palette
from ..errors import FcnsegError
from .base import (IGNORE_INDEX, SegmentationDataset, check_split, holdout_split, pair_folders, read_list,
                   register_dataset)

IGNORE_NAMES = ("void", "ignore")
_IGNORE_KEY = "ignore_value:"


def read_classes_txt(path: Path) -> tuple[list[str], list[list[int]] | None]:
    """Class names in line order and their colours (None when the file gives none)."""
    return _read_classes(path)[:2]


def _read_classes(path: Path) -> tuple[list[str], list[list[int]] | None, int | None]:
    """Names, colours and the ``ignore_value:`` line's value (None when absent)."""
    if not path.is_file():
        raise FcnsegError(f"{path}: class list not found; write one class per line as 'name' or 'name R G B'")
    try:
        text = path.read_text(encoding="utf-8")  # as fcnseg writes it, whatever the locale
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"{path}: unreadable class list ({e}); save it as UTF-8 text") from None
    names, colors, ignore_value = [], [], None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith(_IGNORE_KEY):
            value = line[len(_IGNORE_KEY):].strip()
            if not value.isdigit() or not 0 <= int(value) <= 255:
                raise FcnsegError(f"{path}:{lineno}: 'ignore_value:' takes a mask value 0..255, got {value!r}")
            ignore_value = int(value)
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
    return names, (colors if all(given) else None), ignore_value


def split_source(root: Path, split: str, val_fraction: float = 0.1, seed: int = 0) -> str:
    """Where a split's sample list comes from, for messages ("splits/val.txt", "a 10% hold-out ...")."""
    root = Path(root)
    if (root / "splits").is_dir():
        return str(root / "splits" / f"{split}.txt")
    if split == "all":
        return f"every pair in {root / 'images'}"
    share = f"{val_fraction:.0%}" if split == "val" else f"{1 - val_fraction:.0%}"
    return (f"automatic {share} {split} part of {root / 'images'} (val_fraction={val_fraction}, seed={seed}; "
            f"write splits/train.txt and splits/val.txt to choose)")


@register_dataset("folder")
def folder(root: Path, split: str, transforms=None, skip_bad: bool = False, val_fraction: float = 0.1,
           seed: int = 0, ignore_value: int | None = None) -> SegmentationDataset:
    """Splits come from ``root/splits/{split}.txt``; without a splits folder, ``all`` is every pair and
    ``train``/``val`` hold out ``val_fraction`` of them by ``seed``. ``ignore_value`` (or a line
    ``ignore_value: V`` in classes.txt) is a raw mask value that means "not labelled"."""
    names_all, colors_all, file_ignore = _read_classes(root / "classes.txt")
    if ignore_value is not None and file_ignore is not None and ignore_value != file_ignore:
        raise FcnsegError(f"ignore_value={ignore_value} disagrees with 'ignore_value: {file_ignore}' in "
                          f"{root / 'classes.txt'}; give one")
    ignore_value = file_ignore if ignore_value is None else ignore_value
    if ignore_value is not None:
        if isinstance(ignore_value, bool) or not isinstance(ignore_value, int) or not 0 <= ignore_value <= 255:
            raise FcnsegError(f"ignore_value is a mask value 0..255, got {ignore_value!r}")
        if ignore_value < len(names_all) and names_all[ignore_value].lower() not in IGNORE_NAMES:
            raise FcnsegError(f"ignore_value {ignore_value} is class {names_all[ignore_value]!r} (line "
                              f"{ignore_value + 1} of {root / 'classes.txt'}); rename that line 'void' instead")
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
    if ignore_value is not None:
        value_map[ignore_value] = IGNORE_INDEX
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
    ds = SegmentationDataset(name="folder", root=root, split=split, files=list(files), names=list(names),
                             classes=classes, colors=colors, transforms=transforms, value_map=value_map,
                             color_map=color_map, skip_bad=skip_bad, problems=problems)
    ds.split_source = split_source(root, split, val_fraction, seed)
    return ds
