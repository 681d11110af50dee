"""Reading image and mask files with checks: every bad file becomes one ``DataFileError`` naming it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import FcnsegError

READABLE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM", "GIF")

_EXIF_ORIENTATION = 0x0112

# file suffixes taken for images wherever a folder is listed (datasets, ``fcnseg predict`` inputs)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")


class DataFileError(FcnsegError):
    """A bad data file: the message is ``"{path}: <problem>"`` on one line.

    A DataLoader worker re-raises it in the main process as ``DataFileError("Caught ... Original
    Traceback ...")``; the constructor keeps only the original one-line message, so a bad file stops
    a run with the same line whether it was read in a worker or not.
    """

    def __init__(self, message: str = "") -> None:
        if message.startswith(f"Caught {type(self).__name__}"):
            last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; Pillow's decompression-bomb limit and truncation checks stay on."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # someone switched Pillow into accepting cut-off files; a truncated file must never pass silently
        raise FcnsegError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; fcnseg refuses to read data that way. "
                          "Set it back to False.")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DataFileError(f"{path}: missing {what} (no such file)") from None
    except OSError as e:
        raise DataFileError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    if size == 0:
        raise DataFileError(f"{path}: empty {what} file (0 bytes)")
    try:
        # only the formats fcnseg means to read: Pillow would hand EPS to Ghostscript, an outside program
        im = Image.open(path, formats=READABLE_FORMATS)
        im.load()
    except Image.DecompressionBombError as e:
        raise DataFileError(f"{path}: {what} refused by Pillow's decompression-bomb limit ({e}); if the file is "
                            f"trusted, raise PIL.Image.MAX_IMAGE_PIXELS before loading") from None
    except UnidentifiedImageError:
        raise DataFileError(f"{path}: unreadable {what} (not one of the formats fcnseg reads: "
                            f"{', '.join(READABLE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if "truncated" in msg or isinstance(e, EOFError) else "unreadable"
        raise DataFileError(f"{path}: {kind} {what} ({msg})") from None
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        # using the first frame silently would segment (or train on) a fraction of what the file holds
        raise DataFileError(f"{path}: {what} has {frames} frames (multi-page TIFF or animated GIF/PNG/WebP); fcnseg "
                            f"reads single-frame images: save each frame as its own file")
    return im


def apply_exif(im: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says (cameras store JPEGs sideways)."""
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in (None, 1):
        return im
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def read_image(path: str | Path) -> Image.Image:
    """An RGB PIL image, fully decoded, upright by its EXIF orientation."""
    path = Path(path)
    im = apply_exif(_open(path, "image"))
    if im.mode != "RGB":
        if im.mode in ("I;16", "I;16B", "I", "F"):
            raise DataFileError(f"{path}: image has mode {im.mode} (16-bit or float); fcnseg reads 8-bit images "
                                f"(RGB, RGBA, grey or palette): convert it to 8 bits per channel first")
        im = im.convert("RGB")
    return im


def read_mask(path: str | Path, palette_as_rgb: bool = False) -> np.ndarray:
    """Raw mask values: (H, W) for single-channel PNGs and palette PNGs (their indices, or their colours
    with ``palette_as_rgb``), (H, W, 3) for colour images. Alpha is dropped; EXIF orientation applied.
    """
    path = Path(path)
    im = apply_exif(_open(path, "mask"))
    if im.mode == "P" and palette_as_rgb:
        im = im.convert("RGB")
    elif im.mode in ("RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"):
        im = im.convert("RGB")
    elif im.mode in ("LA", "PA"):
        im = im.getchannel(0)
    elif im.mode == "1":
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        raise DataFileError(f"{path}: mask holds floating-point values; expected integer class ids")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise DataFileError(f"{path}: mask holds negative values; expected class ids >= 0")
    return arr


def read_depth(path: str | Path) -> np.ndarray:
    """A depth map as float32 metres from a 16-bit PNG in millimetres (0 = no measurement)."""
    path = Path(path)
    im = apply_exif(_open(path, "depth map"))
    arr = np.asarray(im)
    if arr.ndim != 2:
        raise DataFileError(f"{path}: depth map has {arr.shape[2]} channels; expected a single-channel 16-bit PNG")
    return arr.astype(np.float32) / 1000.0


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or a (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


def median_image_size(paths, limit: int = 64) -> list[int] | None:
    """[H, W], the median size (upright by EXIF) of up to ``limit`` images, read from their headers only:
    the scale a model trained on them works at (a checkpoint record's ``working_size``). None for no images."""
    sizes = []
    step = max(1, len(paths) // limit) if limit else 1
    for path in list(paths)[::step][:limit or None]:
        try:
            with Image.open(path, formats=READABLE_FORMATS) as im:
                w, h = im.size
                if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways
                    w, h = h, w
        except (OSError, ValueError, SyntaxError):
            continue  # the training checks report bad files; a size estimate can do without them
        sizes.append((h, w))
    if not sizes:
        return None
    arr = np.array(sizes)
    return [int(np.median(arr[:, 0])), int(np.median(arr[:, 1]))]
