"""Scanning a dataset: one line per bad file, class pixel frequencies and median-frequency class weights."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..files import atomic_write
from ..files import output_file
from .base import IGNORE_INDEX, SegmentationDataset
from .io import DataFileError

# problem kinds, recognised from the one-line messages (which stay the single source of the wording)
KINDS = (("missing", ("missing", "has no image")), ("empty", ("0 bytes",)), ("truncated", ("truncated",)),
         ("too large", ("decompression-bomb",)), ("size mismatch", ("but its",)),
         ("bad mask values", ("outside the classes",)), ("unknown colours", ("not in the class table",)),
         ("wrong mask type", ("colour image;", "expects RGB colour-coded", "floating-point", "negative values")),
         ("unreadable", ("",)))


def problem_kind(message: str) -> str:
    for kind, needles in KINDS:
        if any(n in message for n in needles):
            return kind
    return "unreadable"


@dataclass
class CheckReport:
    """What ``check_dataset`` found. ``class_pixels[c]``: pixels of class c; ``image_pixels[c]``: pixels of
    the images in which class c appears (the denominator of median-frequency balancing)."""

    classes: list[str]
    samples: int = 0
    good: int = 0
    problems: list[str] = field(default_factory=list)
    class_pixels: np.ndarray | None = None
    image_pixels: np.ndarray | None = None
    ignored_pixels: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            k = problem_kind(p)
            out[k] = out.get(k, 0) + 1
        return out

    def frequencies(self) -> np.ndarray:
        """Share of labelled pixels per class."""
        total = self.class_pixels.sum()
        return self.class_pixels / total if total else np.zeros_like(self.class_pixels, dtype=float)

    def class_weights(self) -> list[float]:
        return median_frequency_weights(self.class_pixels, self.image_pixels)


def median_frequency_weights(class_pixels: np.ndarray, image_pixels: np.ndarray) -> list[float]:
    """Eigen & Fergus (2015) balancing as in SegNet: freq(c) = pixels of c / pixels of the images containing c,
    weight(c) = median(freq) / freq(c). A class that never occurs gets weight 0."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    image_pixels = np.asarray(image_pixels, dtype=np.float64)
    present = (class_pixels > 0) & (image_pixels > 0)
    if not present.any():
        return [0.0] * len(class_pixels)
    freq = np.zeros_like(class_pixels)
    freq[present] = class_pixels[present] / image_pixels[present]
    median = np.median(freq[present])
    return [float(median / f) if p else 0.0 for f, p in zip(freq, present)]


def check_dataset(dataset: SegmentationDataset, progress: Callable | None = None,
                  on_problem: Callable[[str], None] | None = None) -> CheckReport:
    """Read every pair of ``dataset`` with the checks training uses, collecting problems instead of stopping.

    Build the dataset with ``skip_bad=True`` so missing partners are collected too (``dataset.problems``).
    ``on_problem`` is called with each message as it is found; ``progress`` wraps the index iterator (tqdm).
    """
    k = dataset.num_classes
    report = CheckReport(classes=list(dataset.classes), samples=len(dataset) + len(dataset.problems),
                         class_pixels=np.zeros(k, dtype=np.int64), image_pixels=np.zeros(k, dtype=np.int64))
    for message in dataset.problems:
        report.problems.append(message)
        if on_problem:
            on_problem(message)
    indices = range(len(dataset))
    for i in progress(indices) if progress else indices:
        try:
            _, mask = dataset.load(i)
        except DataFileError as e:
            report.problems.append(str(e))
            if on_problem:
                on_problem(str(e))
            continue
        counts = np.bincount(np.asarray(mask).ravel(), minlength=256)
        report.class_pixels += counts[:k]
        report.image_pixels += np.where(counts[:k] > 0, counts.sum(), 0)
        report.ignored_pixels += int(counts[IGNORE_INDEX])
        report.good += 1
    return report


def write_weights_json(report: CheckReport, path: str | Path, **about) -> Path:
    """The class statistics as JSON for training (``class_weights`` in class order)."""
    path = output_file(path, what="class-weights file")
    data = {**about, "classes": report.classes, "ignore_index": IGNORE_INDEX,
            "method": "median_frequency (Eigen & Fergus 2015)",
            "class_weights": [round(w, 6) for w in report.class_weights()],
            "class_pixels": report.class_pixels.tolist(), "frequencies": [round(float(f), 8) for f in report.frequencies()],
            "ignored_pixels": report.ignored_pixels, "samples_checked": report.good, "problems": len(report.problems)}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    return path


def load_class_weights(path: str | Path, classes: list[str] | None = None) -> list[float]:
    """``class_weights`` from a JSON written by ``fcnseg data check``; checks the class list when given."""
    from ..errors import FcnsegError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        weights = [float(w) for w in data["class_weights"]]
    except FileNotFoundError:
        raise FcnsegError(f"{path}: no such class-weights file; 'fcnseg data check ... --weights-json {path}' "
                          f"writes one") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FcnsegError(f"{path}: not a class-weights JSON ({e})") from None
    if classes is not None and data.get("classes") != list(classes):
        raise FcnsegError(f"{path}: weights are for classes {data.get('classes')}, not this dataset's {list(classes)}")
    return weights
