"""The dataset registry and the base class every family shares: listed files, read with checks, ids mapped."""
from __future__ import annotations

import errno
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import FcnsegError
from ..record import IMAGENET_MEAN, IMAGENET_STD
from ..registry import Registry
from .io import IMAGE_SUFFIXES, DataFileError, image_size, read_image, read_mask
from .transforms import IGNORE_INDEX, build_transforms

_DATASETS: Registry[Callable[..., "SegmentationDataset"]] = Registry("dataset")


def register_dataset(name: str):
    """Register a builder ``fn(root, split, transforms=None, **kwargs)``; the same name twice is a bug."""
    return _DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of every registered dataset family, sorted."""
    return _DATASETS.names()


def build_dataset(name: str, root: str | Path, split: str, transforms=None, **kwargs) -> "SegmentationDataset":
    """A dataset of ``(image, mask)`` pairs, e.g. ``build_dataset("camvid", "/data/camvid", "train")``.

    ``transforms`` is a callable ``(PIL image, PIL mask) -> (tensor, tensor)`` (see ``build_transforms``);
    None gives the dataset's evaluation preset (normalised tensors at the original resolution).
    ``skip_bad=True`` keeps listing problems (missing partners) in ``.problems`` and replaces unreadable or
    inconsistent samples (see ``fetch``) instead of stopping; ``fcnseg train --skip-bad`` leaves them out.
    """
    builder = _DATASETS.get(name)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FcnsegError(f"{root}: no such dataset directory (for {name}; "
                          f"'fcnseg data download {name} --root DIR' fetches the public ones)")
    return builder(root, split, transforms=transforms, **kwargs)


def check_split(dataset: str, split: str, valid: Iterable[str]) -> None:
    valid = list(valid)
    if split not in valid:
        raise FcnsegError(f"unknown split {split!r} for {dataset}; valid splits: {', '.join(valid)}")


def read_list(path: Path) -> list[str]:
    """Sample names from a split file: one per line, blank lines and ``#`` comments skipped."""
    if not path.is_file():
        raise FcnsegError(f"{path}: split list not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"{path}: unreadable split list ({e})") from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


def holdout_split(names: list[str], split: str, val_fraction: float, seed: int) -> list[str]:
    """A deterministic train/val partition of ``names``: the same seed gives the same val set on any machine."""
    if not 0 < val_fraction < 1:
        raise FcnsegError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    val = set(order[: max(1, round(len(names) * val_fraction))])
    return [n for i, n in enumerate(names) if (i in val) == (split == "val")]


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5, 255] -> '0-2, 5, 255' for messages."""
    out, values = [], sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(f"{values[i]}" if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


class SegmentationDataset(Dataset):
    """Pairs of (image file, mask file); raw mask values (ids or RGB colours) are mapped to class ids.

    ``value_map`` maps raw single-channel values to class ids or IGNORE_INDEX (unlisted values are
    errors; 255 always means ignore); ``color_map`` maps (r, g, b) to class ids or IGNORE_INDEX for
    colour-coded masks. A family leaves one of them None to refuse that kind of mask.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, *, name: str, root: Path, split: str, files: list[tuple[Path, Path]], names: list[str],
                 classes: list[str], colors: list[list[int]], transforms=None,
                 value_map: dict[int, int] | None = None, color_map: dict[tuple[int, int, int], int] | None = None,
                 skip_bad: bool = False, problems: list[str] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.name, self.root, self.split = name, Path(root), split
        self.classes = list(classes)
        self.colors = [list(map(int, c)) for c in colors]
        self.mean, self.std = tuple(mean), tuple(std)
        self.skip_bad = skip_bad
        self.skipped: list[str] = []  # messages of samples skipped in this process
        self._lut, self._valid = self._make_lut(value_map)
        self._color_codes, self._color_ids = self._make_color_lookup(color_map)
        # missing partners: the listing itself is checked up front (a stat per file)
        self.problems: list[str] = list(problems or [])
        kept_files, kept_names = [], []
        for (img, mask), n in zip(files, names):
            missing = [m for m in (_missing(Path(img), "image", n), _missing(Path(mask), "mask", n)) if m]
            if missing:
                self.problems.extend(missing)
            else:
                kept_files.append((Path(img), Path(mask)))
                kept_names.append(n)
        if self.problems and not skip_bad:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise DataFileError(f"{self.problems[0]}{more}; run 'fcnseg data check --dataset {name} --root {root} "
                                f"--split {split}' to list them, or train with --skip-bad (build_dataset: "
                                f"skip_bad=True) to leave them out")
        self.files, self.names = kept_files, kept_names
        if not self.files:
            found = f" ({len(self.problems)} missing files, e.g. {self.problems[0]})" if self.problems else ""
            raise FcnsegError(f"{root}: no samples for split {split!r} of {name}{found}")
        if transforms is None:
            transforms = build_transforms(self.preset, train=False, mean=self.mean, std=self.std)
        self.transforms = transforms

    # which build_transforms preset fits this dataset; families override when it differs from the name
    @property
    def preset(self) -> str:
        return self.name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, split={self.split!r}, {len(self)} samples, "
                f"{self.num_classes} classes, root={str(self.root)!r})")

    # ---- mask decoding -------------------------------------------------------------------------------------
    @staticmethod
    def _make_lut(value_map):
        if value_map is None:
            return None, None
        value_map = {**value_map, IGNORE_INDEX: IGNORE_INDEX}
        size = max(256, max(value_map) + 1)
        lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
        valid = np.zeros(size, dtype=bool)
        for raw, cls in value_map.items():
            lut[raw] = cls
            valid[raw] = True
        return lut, valid

    @staticmethod
    def _make_color_lookup(color_map):
        if color_map is None:
            return None, None
        items = sorted(((r << 16) | (g << 8) | b, cls) for (r, g, b), cls in color_map.items())
        return (np.array([c for c, _ in items], dtype=np.int64), np.array([i for _, i in items], dtype=np.uint8))

    def decode_mask(self, path: Path, raw: np.ndarray) -> np.ndarray:
        """Class ids (H, W) uint8 with IGNORE_INDEX from raw mask values; bad values raise DataFileError."""
        if raw.ndim == 3:
            if self._color_codes is None:
                raise DataFileError(f"{path}: mask is a {raw.shape[2]}-channel colour image; {self.name} expects "
                                    f"single-channel class ids")
            raw = raw[..., :3].astype(np.int64)
            codes = (raw[..., 0] << 16) | (raw[..., 1] << 8) | raw[..., 2]
            idx = np.searchsorted(self._color_codes, codes).clip(0, len(self._color_codes) - 1)
            known = self._color_codes[idx] == codes
            if not known.all():
                bad = np.unique(codes[~known])
                shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in bad[:8])
                more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
                raise DataFileError(f"{path}: RGB colours {shown}{more} are not in the class table "
                                    f"({int((~known).sum())} pixels)")
            return self._color_ids[idx]
        if self._lut is None:
            raise DataFileError(f"{path}: mask is single-channel; {self.name} expects RGB colour-coded labels")
        counts = np.bincount(raw.ravel(), minlength=len(self._lut))
        invalid = counts[: len(self._valid)] * ~self._valid
        extra = counts[len(self._valid):]
        if invalid.any() or extra.any():
            bad = np.flatnonzero(invalid).tolist() + (np.flatnonzero(extra) + len(self._valid)).tolist()
            shown = ", ".join(map(str, bad[:12])) + (f" and {len(bad) - 12} more" if len(bad) > 12 else "")
            valid = _ranges(np.flatnonzero(self._valid).tolist())
            raise DataFileError(f"{path}: mask values {shown} are outside the classes and ignore index "
                                f"(valid values: {valid})")
        return self._lut[raw]

    # ---- reading -------------------------------------------------------------------------------------------
    def read_mask(self, path: Path) -> np.ndarray:
        return read_mask(path, palette_as_rgb=self._lut is None)

    def load_image(self, index: int):
        """The image as the transforms take it (a PIL RGB image unless a family adds channels)."""
        return read_image(self.files[index][0])

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The checked pair before transforms: (PIL image, PIL ``L`` mask of class ids); bad files raise."""
        img_path, mask_path = self.files[index]
        image = self.load_image(index)
        ids = self.decode_mask(mask_path, self.read_mask(mask_path))
        (w, h), (mw, mh) = image_size(image), (ids.shape[1], ids.shape[0])
        if (w, h) != (mw, mh):
            raise DataFileError(f"{img_path}: image is {w}x{h} but its mask {mask_path} is {mw}x{mh} "
                                f"(after EXIF orientation)")
        return image, Image.fromarray(ids)

    def check(self, index: int) -> str | None:
        """The problem of sample ``index`` as one line (the reads and checks of ``load``), or None."""
        try:
            self.load(index)
        except DataFileError as e:
            return str(e)
        return None

    def fetch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The transformed pair ``index`` and the messages of the bad samples met on the way.

        Without ``skip_bad`` a bad pair raises DataFileError. With it, a bad pair is replaced by the next
        good one (a batch needs its slot filled) and its message returned, so the caller counts and reports
        it; ``fcnseg train --skip-bad`` checks every sample first, so this only happens to a file that
        changed during the run.
        """
        problems = []
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                image, mask = self.load(i)
            except DataFileError as e:
                if not self.skip_bad:
                    raise
                problems.append(str(e))
                continue
            image, mask = self.transforms(image, mask)
            return image, mask, problems
        raise FcnsegError(f"{self.root}: every sample of split {self.split!r} is bad; run 'fcnseg data check'")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask, problems = self.fetch(index)
        for message in problems:
            self.skipped.append(message)
            warnings.warn(f"skipped bad sample: {message}", stacklevel=2)
        return image, mask


def _missing(path: Path, what: str, name: str) -> str | None:
    """Why ``path`` is not a readable file for sample ``name`` (one line), or None when it is a regular file."""
    if path.is_file():
        return None
    why = ""
    if path.is_dir():
        why = " (a directory, not a file)"
    elif path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            why = " (a symlink loop)" if e.errno == errno.ELOOP else " (a broken symlink)"
    return f"{path}: missing {what} for sample {name!r}{why}"


def pair_folders(image_dir: Path, mask_dir: Path, mask_name=lambda stem: f"{stem}.png",
                 image_suffixes: Sequence[str] = IMAGE_SUFFIXES) -> tuple[list[tuple[Path, Path]], list[str], list[str]]:
    """Pair every image in ``image_dir`` with ``mask_dir / mask_name(stem)``.

    Returns (files, names, problems); images without masks are kept (the dataset reports them as
    missing partners), masks without images are reported in ``problems``.
    """
    if not image_dir.is_dir():
        raise FcnsegError(f"{image_dir}: image folder not found")
    if not mask_dir.is_dir():
        raise FcnsegError(f"{mask_dir}: mask folder not found")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in image_suffixes and not p.name.startswith("."))
    files = [(p, mask_dir / mask_name(p.stem)) for p in images]
    wanted = {m.name for _, m in files}
    problems = [f"{m}: mask has no image in {image_dir}" for m in sorted(mask_dir.iterdir())
                if m.suffix.lower() in image_suffixes and not m.name.startswith(".") and m.name not in wanted]
    return files, [p.stem for p in images], problems
