"""The driver: a labelling tool's export, parsed and checked, written as a folder dataset (``images/``, ``masks/``,
``classes.txt``, ``splits/``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import FcnsegError
from ...files import atomic_write
from ...record import default_palette
from ..base import IGNORE_INDEX, holdout_split
from ..folder import IGNORE_NAMES
from ..io import IMAGE_SUFFIXES, DataFileError, read_image
from .checks import MAX_SHAPES, brief, checked_shape, file_stem, label_problem
from .coco import parse_coco
from .cvat import parse_cvat
from .labelme import parse_labelme
from .shapes import ImageEntry, ImportReport, Shape, rasterize

FORMATS = ("labelme", "coco", "cvat")
PARSERS = {"labelme": parse_labelme, "coco": parse_coco, "cvat": parse_cvat}


def _class_names(labels: list[str], classes: list[str] | None, background: str,
                 first_use: dict[str, str]) -> list[str]:
    """Class 0 and the classes after it, each checked to read back from classes.txt as written."""
    problem = label_problem(background)
    if problem or background.lower() in IGNORE_NAMES:
        raise FcnsegError(f"background name {brief(background)} "
                          + (problem or "is read as 'ignored' in classes.txt") + "; choose another --background")
    if classes is not None:
        for c in classes:
            problem = label_problem(c)
            if problem:
                raise FcnsegError(f"class {brief(c)} in --classes {problem}")
            if classes.count(c) > 1:
                raise FcnsegError(f"class {brief(c)} is listed twice in --classes")
    chosen = [c for c in (labels if classes is None else classes) if c != background and c.lower() not in IGNORE_NAMES]
    for c in chosen:
        problem = label_problem(c)
        if problem:
            raise FcnsegError(f"label {brief(c)} (first at {first_use.get(c, '?')}) {problem}; rename it in the "
                              f"labelling tool (or leave it out with --classes)")
    return [background] + chosen



def import_annotations(fmt: str, src: str | Path, out: str | Path, *, images: str | Path | None = None,
                       background: str = "background", unlabelled: str = "background",
                       classes: list[str] | None = None, val_fraction: float = 0.1, seed: int = 0,
                       allow_outside: bool = False) -> ImportReport:
    """Convert a labelling tool's export at ``src`` into a folder dataset at ``out`` (new or empty).

    Class 0 is ``background``; the labels follow in the order of ``classes`` if given (a label not
    listed is reported and left out), else sorted. Labels named ``void`` or ``ignore`` (any case) are
    drawn as ignored pixels (255), not as a class. Pixels no shape covers are background, or ignored
    with ``unlabelled="ignore"``. ``images`` is where the export's image files are, when not beside the
    annotation file; files are read only from inside those folders unless ``allow_outside``. A label
    that classes.txt could not hold exactly (see ``label_problem``) stops the import before anything is
    written. Returns the report; every left-out shape or image is one line in it.
    """
    src, out, images_dir = _checked_arguments(fmt, src, out, images, unlabelled, val_fraction)
    problems: list[str] = []
    entries = _parsed(fmt, src, images_dir, problems, allow_outside)
    classes, ids, colors = _class_ids(entries, classes, background, src)
    report = ImportReport(out=out, classes=classes, problems=problems)
    written = []
    for e in entries:
        shapes = _checked_shapes(e, ids, problems)
        if shapes is None:
            continue
        try:
            image = read_image(e.path) if e.path else read_image_bytes(e.data, e.name)
        except DataFileError as err:
            problems.append(f"{err}; skipped")
            continue
        if image.size != (e.width, e.height):
            problems.append(f"{e.path or e.name}: image is {image.size[0]}x{image.size[1]} but the annotation says "
                            f"{e.width}x{e.height}; skipped")
            continue
        _write_pair(out, e, _draw(e, shapes, ids, unlabelled, report), colors)
        written.append(e.name)
    if not written:
        raise FcnsegError(f"{src}: no image could be converted ({len(problems)} problems, first: "
                          f"{problems[0] if problems else 'none'})")
    val = holdout_split(written, "val", val_fraction, seed) if len(written) > 1 else []
    train = [n for n in written if n not in set(val)]
    write_classes_txt(out / "classes.txt", classes, colors)
    for split, items in (("train", train), ("val", val), ("all", written)):
        atomic_write(out / "splits" / f"{split}.txt", lambda tmp, items=items: Path(tmp).write_text(
            "".join(f"{n}\n" for n in items), encoding="utf-8"))
    report.images, report.train, report.val = len(written), len(train), len(val)
    return report


def _checked_arguments(fmt: str, src: str | Path, out: str | Path, images: str | Path | None, unlabelled: str,
                       val_fraction: float) -> tuple[Path, Path, Path | None]:
    """The export, output and image folder as paths; arguments ``import_annotations`` cannot work with are
    refused in one line before anything is read."""
    if fmt not in PARSERS:
        raise FcnsegError(f"unknown annotation format {fmt!r}; valid: {', '.join(FORMATS)}")
    if unlabelled not in ("background", "ignore"):
        raise FcnsegError(f"unlabelled must be 'background' or 'ignore', got {unlabelled!r}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    images_dir = Path(images).expanduser() if images else None
    if not src.exists():
        raise FcnsegError(f"{src}: no such {fmt} export")
    if images_dir is not None and not images_dir.is_dir():
        raise FcnsegError(f"{images_dir}: no such image folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FcnsegError(f"{out}: already exists and is not an empty folder; choose a new --out")
    if not 0 < val_fraction < 1:
        raise FcnsegError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    return src, out, images_dir


def _parsed(fmt: str, src: Path, images_dir: Path | None, problems: list[str],
            allow_outside: bool) -> list[ImageEntry]:
    """The export's images, each renamed to the stem it is written under; names must stay unique."""
    src_file = src if fmt == "labelme" or src.is_file() else _default_file(fmt, src)
    entries = PARSERS[fmt](src_file, images_dir, problems, allow_outside)
    for e in entries:
        e.name = file_stem(e.name)
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FcnsegError(f"{src}: several images share the name {dupes[0]!r} (without extension); "
                          f"masks are matched by name, so rename them in the export")
    return entries


def _class_ids(entries: list[ImageEntry], classes: list[str] | None, background: str,
               src: Path) -> tuple[list[str], dict[str, int], list[list[int]]]:
    """The class list, the mask value of every label (ignored labels: 255) and each class's colour (the tool's
    colour when the export gives one)."""
    first_use: dict[str, str] = {}
    for e in entries:
        for s in e.shapes:
            first_use.setdefault(s.label, s.where)
    classes = _class_names(sorted(first_use), classes, background, first_use)
    ids = {c: i for i, c in enumerate(classes)}
    ids.update({label: IGNORE_INDEX for label in first_use if label.lower() in IGNORE_NAMES})
    if len(classes) > 255:
        raise FcnsegError(f"{src}: {len(classes)} classes; at most 255 (value 255 is the ignore index)")
    given_colors = {k: v for e in entries for k, v in e.colors.items()}
    palette = default_palette(len(classes))
    return classes, ids, [given_colors.get(c, palette[i]) for i, c in enumerate(classes)]


def _checked_shapes(e: ImageEntry, ids: dict[str, int], problems: list[str]) -> list[Shape] | None:
    """The image's shapes that can be drawn, every one checked before the image is read or anything is drawn;
    None when the whole image is skipped (too many shapes, a suffix the folder reader would not list)."""
    if len(e.shapes) > MAX_SHAPES:
        problems.append(f"{e.path or e.name}: {len(e.shapes):,} shapes; at most {MAX_SHAPES:,} an image; skipped")
        return None
    if e.suffix not in IMAGE_SUFFIXES:
        problems.append(f"{e.path or e.name}: {brief(e.suffix)} is not an image suffix the folder reader lists "
                        f"({' '.join(IMAGE_SUFFIXES)}); skipped")
        return None
    shapes = []
    for s in e.shapes:
        if s.label not in ids:
            problems.append(f"{s.where}: label {brief(s.label)} is not in the class list; left out")
            continue
        checked = checked_shape(s, e.width, e.height)
        if isinstance(checked, str):
            problems.append(f"{s.where}: {checked}; left out")
        else:
            shapes.append(checked)
    return shapes


def _draw(e: ImageEntry, shapes: list[Shape], ids: dict[str, int], unlabelled: str,
          report: ImportReport) -> np.ndarray:
    """The image's mask: the shapes drawn in order (later ones cover earlier ones), counted in ``report``."""
    mask = np.full((e.height, e.width), IGNORE_INDEX if unlabelled == "ignore" else 0, dtype=np.uint8)
    for s in shapes:
        bits = rasterize(s, e.width, e.height)
        if not bits.any():
            report.problems.append(f"{s.where}: covers no pixel of the {e.width}x{e.height} image; left out")
            continue
        mask[bits] = ids[s.label]
        report.shapes += 1
        if ids[s.label] == IGNORE_INDEX:
            report.ignored[s.label] = report.ignored.get(s.label, 0) + 1
    return mask

def write_classes_txt(path: Path, classes: list[str], colors: list[list[int]]) -> None:
    """``name R G B`` per line, read back by ``fcnseg.data.folder`` as the same names (``label_problem`` says which
    names could not be)."""
    for c in classes:
        problem = label_problem(c)
        if problem:
            raise FcnsegError(f"class {brief(c)} {problem}")
    lines = [f"{c} {r} {g} {b}" for c, (r, g, b) in zip(classes, colors)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))


def _default_file(fmt: str, src: Path) -> Path:
    """The annotation file inside an unpacked export folder."""
    cands = [src / "annotations.xml"] if fmt == "cvat" else sorted((src / "annotations").glob("*.json")) + sorted(
        src.glob("*.json"))
    for c in cands:
        if c.is_file():
            return c
    raise FcnsegError(f"{src}: a folder without {'annotations.xml' if fmt == 'cvat' else 'a COCO .json'}; "
                      f"pass the annotation file itself")


def read_image_bytes(data: bytes, name: str) -> Image.Image:
    """An image embedded in a labelme JSON, checked like a file (written to a temporary one)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.img"
        path.write_bytes(data)
        return read_image(path)


def _write_pair(out: Path, e: ImageEntry, mask: np.ndarray, colors: list[list[int]]) -> None:
    if e.path is not None:  # copied byte for byte: re-encoding a JPEG would change its pixels
        atomic_write(out / "images" / f"{e.name}{e.suffix}", lambda tmp: shutil.copyfile(e.path, tmp))
    else:
        atomic_write(out / "images" / f"{e.name}{e.suffix}", lambda tmp: Path(tmp).write_bytes(e.data))
    pal = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    flat = [v for c in colors for v in c]
    pal.putpalette(flat + [0] * (768 - len(flat)))
    atomic_write(out / "masks" / f"{e.name}.png", lambda tmp: pal.save(tmp, format="PNG"))
