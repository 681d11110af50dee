"""What the OpenAPI document says the service takes and gives: the upload, the answers and every error."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_BINARY = {"type": "string", "format": "binary"}
# the raw-body media types the service documents; any other non-multipart type is read the same way
RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff", "image/gif",
                   "application/octet-stream")

IMAGE_BODY: dict[str, Any] = {
    "required": True,
    "description": "the image: a multipart upload whose first file is the image, or the file's bytes as the body",
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"image": _BINARY},
                                           "required": ["image"]}},
        **{kind: {"schema": _BINARY} for kind in RAW_IMAGE_TYPES},
    },
}


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every refusal and failure: ``{"error": {"status", "code", "message"}}``."""

    error: ErrorDetail


class ClassShare(BaseModel):
    id: int
    name: str
    color: list[int]
    pixels: int
    share: float


class SegmentResult(BaseModel):
    """``format=json``: pixel shares per class; the mask and the uncertainty map when asked for (base64)."""

    model: str
    width: int
    height: int
    classes: list[ClassShare]
    mask_png: str | None = None
    mask_ids: str | None = None
    uncertainty_png: str | None = None


class Health(BaseModel):
    status: str
    models: list[str]
    queue_depth: int


class ModelInfo(BaseModel):
    name: str
    arch: str | None
    num_classes: int
    classes: list[str]
    colors: list[list[int]]
    metrics: dict[str, Any] | None
    sha256: str | None


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


SEGMENT_OK: dict[str, Any] = {
    "model": SegmentResult,
    "description": "format=json: the result as JSON; format=mask: the palette PNG of class ids; "
                   "format=overlay: a JPEG of the class colours over the image",
    "content": {"image/png": {"schema": _BINARY}, "image/jpeg": {"schema": _BINARY}},
}

_WHY = {
    400: "empty, truncated or corrupt image; malformed multipart upload",
    401: "missing or wrong API key",
    404: "no loaded model of that name",
    408: "the upload did not arrive within --body-timeout",
    413: "upload larger than --max-upload-mb, or more pixels than --max-pixels",
    415: "not an image format the server reads, a 16-bit or float image, or an image of several frames",
    422: "a query parameter out of its range or of the wrong type",
    500: "the server failed on this request",
    503: "--max-queue requests already in flight, or shutting down (see Retry-After)",
    504: "not answered within --timeout",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, each with the JSON error body."""
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}
