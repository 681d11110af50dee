"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): image uploads that are real images.

The OpenAPI document can say an upload is binary but not that it decodes as a PNG; without these hooks
every "schema-valid" body is random bytes that the service rightly refuses (415/400), so the
positive-data check could never pass. The negative phase still sends what the schema forbids."""
from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

# media type -> Pillow format name
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/bmp": "BMP",
            "image/tiff": "TIFF", "image/gif": "GIF", "application/octet-stream": "PNG"}


def _encode(fmt: str, width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def images(fmt: str) -> st.SearchStrategy[bytes]:
    """Small random images of ``fmt`` (8..40 pixels a side)."""
    side = st.integers(8, 40)
    return st.builds(_encode, st.just(fmt), side, side, st.integers(0, 2**16))


for _media_type, _fmt in _FORMATS.items():
    schemathesis.openapi.media_type(_media_type, images(_fmt))
schemathesis.openapi.format("binary", images("PNG"))  # the multipart form's file field
