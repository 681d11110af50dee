"""Uploaded bytes -> an RGB PIL image, with the same orientation and colour handling as ``read_image``,
and every limit (bytes, pixels, format) checked before the expensive step it protects."""
from __future__ import annotations

import io
from typing import AsyncIterator

from PIL import Image, ImageFile, UnidentifiedImageError

from ..data.io import apply_exif


class UploadError(Exception):
    """A bad upload: an HTTP status, a short machine-readable code and a one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """All of ``chunks``, refusing (413) as soon as more than ``limit`` bytes have arrived, so an
    oversized body is never held in memory."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise UploadError(413, "upload_too_large", f"upload is larger than the limit of {limit} bytes")
    return bytes(buf)


async def limited_stream(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``chunks`` passed through, refusing (413) past ``limit`` bytes (for the multipart parser)."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise UploadError(413, "upload_too_large", f"upload is larger than the limit of {limit} bytes")
        yield chunk


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An upright RGB image from encoded bytes, as ``fcnseg.data.io.read_image`` gives for a file.

    The header is read first and the pixel count checked against ``max_pixels`` before any pixel is
    decoded (a decompression bomb is a few KB that expand to gigabytes). Pillow's own bomb check
    stays on as a second line; the process-wide ``Image.MAX_IMAGE_PIXELS`` is left as it is.
    """
    if not data:
        raise UploadError(400, "empty_upload", "the upload is empty (0 bytes); send an image file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # same refusal as read_image: a cut-off upload must not pass
        raise UploadError(500, "server_misconfigured", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True on the server")
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        if width * height > max_pixels:
            raise UploadError(413, "too_many_pixels", f"image is {width}x{height} = {width * height} pixels; "
                                                      f"the limit is {max_pixels} pixels")
        im.load()
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError(413, "too_many_pixels", f"image refused as a decompression bomb; the limit is "
                                                  f"{max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise UploadError(415, "unsupported_image", "not an image format the server can read "
                                                    "(send PNG, JPEG, BMP, TIFF, WebP or PPM)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UploadError(400, "unreadable_image", f"the image could not be decoded ({msg})") from None
    im = apply_exif(im)
    if im.mode in ("I;16", "I;16B", "I", "F"):
        raise UploadError(415, "unsupported_image", f"image has mode {im.mode} (16-bit/float single channel); "
                                                    f"send 8-bit RGB")
    return im.convert("RGB") if im.mode != "RGB" else im
