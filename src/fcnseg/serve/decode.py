"""Uploaded bytes -> an RGB PIL image, with the same orientation and colour handling as ``read_image``,
and every limit (bytes, time, pixels, frames, format) checked before the expensive step it protects."""
from __future__ import annotations

import io
import tempfile
from typing import AsyncIterator, BinaryIO

from PIL import Image, ImageFile, UnidentifiedImageError

from ..data.io import READABLE_FORMATS, apply_exif

# the formats' names as a user knows them, for the 415 message
FORMAT_NAMES = "PNG, JPEG, BMP, TIFF, WebP, PPM/PGM or GIF"


class UploadError(Exception):
    """A bad upload: an HTTP status, a short machine-readable code and a one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def too_large(limit: int) -> UploadError:
    return UploadError(413, "upload_too_large", f"upload is larger than the limit of {limit} bytes")


def clip(text: object, limit: int = 80) -> str:
    """``repr(text)`` cut to about ``limit`` characters: what a message may echo of a client's input."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(str(text))} characters)"


async def spool_limited(chunks: AsyncIterator[bytes], limit: int, spool_bytes: int,
                        progress: list[int] | None = None) -> BinaryIO:
    """``chunks`` written to a temporary file that stays in memory up to ``spool_bytes`` and moves to disk
    beyond, refusing (413) past ``limit`` bytes; returned rewound. So a slow upload holds at most
    ``spool_bytes`` of memory however large it is declared. ``progress[0]`` counts the bytes as they come
    (for the message when the upload is cut)."""
    spool = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
    try:
        async for chunk in limited_stream(chunks, limit, progress):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


async def limited_stream(chunks: AsyncIterator[bytes], limit: int,
                         progress: list[int] | None = None) -> AsyncIterator[bytes]:
    """``chunks`` passed through, refusing (413) past ``limit`` bytes (for the multipart parser)."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if progress is not None:
            progress[0] = seen
        if seen > limit:
            raise too_large(limit)
        yield chunk


def multi_frame_message(frames: int) -> str:
    """The words ``fcnseg predict`` uses for a file with several frames (``fcnseg.data.io.read_image``)."""
    return (f"image has {frames} frames (multi-page TIFF or animated GIF/PNG/WebP); fcnseg reads single-frame "
            f"images: save each frame as its own file")


def decode_image(data: bytes | BinaryIO, max_pixels: int, values_per_pixel: int = 1) -> Image.Image:
    """An upright RGB image from encoded bytes (or a binary file), as ``fcnseg.data.io.read_image`` gives
    for a file.

    Only ``READABLE_FORMATS`` are opened, so no upload reaches a format plugin that hands data to an
    outside program (Pillow gives EPS to Ghostscript). The header is read first and the pixel count
    checked against ``max_pixels`` before any pixel is decoded (a decompression bomb is a few KB that
    expand to gigabytes); ``values_per_pixel`` > 1 counts each pixel that many times (the class
    probabilities behind an uncertainty map hold one value per class and pixel). An image of several
    frames is refused as ``fcnseg predict`` refuses it. Pillow's own bomb check stays on as a second
    line; the process-wide ``Image.MAX_IMAGE_PIXELS`` is left as it is.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    stream.seek(0, io.SEEK_END)
    if stream.tell() == 0:
        raise UploadError(400, "empty_upload", "the upload is empty (0 bytes); send an image file")
    stream.seek(0)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # same refusal as read_image: a cut-off upload must not pass
        raise UploadError(500, "server_misconfigured", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True on the server")
    try:
        im = Image.open(stream, formats=READABLE_FORMATS)
        width, height = im.size
        if width * height > max_pixels:
            raise UploadError(413, "too_many_pixels", f"image is {width}x{height} = {width * height} pixels; "
                                                      f"the limit is {max_pixels} pixels")
        if width * height * values_per_pixel > max_pixels:
            raise UploadError(413, "too_many_pixels",
                              f"an uncertainty map of a {width}x{height} image needs {values_per_pixel} class "
                              f"probabilities per pixel = {width * height * values_per_pixel} values; the limit "
                              f"is {max_pixels} (--max-pixels); send at most {max_pixels // values_per_pixel} "
                              f"pixels or leave out uncertainty")
        frames = getattr(im, "n_frames", 1)
        if frames > 1:  # the first frame alone would answer for a fraction of what was sent
            raise UploadError(415, "multi_frame_image", multi_frame_message(frames))
        im.load()
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError(413, "too_many_pixels", f"image refused as a decompression bomb; the limit is "
                                                  f"{max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise UploadError(415, "unsupported_image", f"not an image format the server reads (send {FORMAT_NAMES})") \
            from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UploadError(400, "unreadable_image", f"the image could not be decoded ({msg})") from None
    im = apply_exif(im)
    if im.mode in ("I;16", "I;16B", "I", "F"):
        raise UploadError(415, "unsupported_image", f"image has mode {im.mode} (16-bit/float single channel); "
                                                    f"send 8-bit RGB")
    return im.convert("RGB") if im.mode != "RGB" else im
