"""The ASGI app: parses HTTP requests into typed values, hands images to the same ``Segmenter`` the
CLI uses (through the micro-batcher, off the event loop), and serves the web page in ``static/``."""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Hashable, Sequence

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..hardware import return_freed_memory
from ..inference.segmenter import Prediction, Segmenter
from ..inference.uncertainty import normalized_entropy, to_png_array
from ..inference.visualize import overlay, palette_image
from . import schema
from .batcher import DeadlineExceeded, MicroBatcher, QueueFull, ShuttingDown
from .decode import UploadError, clip, decode_image, limited_stream, spool_limited, too_large
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# what a multipart envelope may add around the file itself (boundaries, part headers, small fields)
MULTIPART_SLACK = 64 << 10
# the page loads only its own files; images it draws come from blob: URLs it makes
PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; object-src 'none'"


@dataclass(frozen=True)
class ServeSettings:
    """Limits and switches of one app (``fcnseg serve`` fills them from its flags)."""

    max_batch: int = 8
    batch_window_ms: float = 5.0
    workers: int = 1
    max_queue: int = 64
    timeout_s: float = 30.0
    max_upload_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    retry_after_s: int = 1
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    # the whole body must arrive within this (and within timeout_s), else 408: a stalled upload holds
    # a connection and a queue place, never more
    body_timeout_s: float = 15.0
    # an upload's bytes stay in memory up to this size and go to a temporary file beyond
    spool_bytes: int = 1 << 20
    # hand freed heap memory back to the OS (glibc malloc_trim) whenever the last request in flight is
    # answered; process-wide, so the program opts in (``fcnseg serve`` does), not the app by default
    return_memory: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "workers", "max_queue", "max_upload_bytes", "max_pixels", "spool_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.body_timeout_s <= 0 or self.batch_window_ms < 0:
            raise ValueError("timeout_s and body_timeout_s must be positive and batch_window_ms non-negative")
        if self.api_key is not None:
            check_api_key(self.api_key)


def check_api_key(key: str) -> None:
    """Refuse a key that would serve without protection ('') or that no client could send in a header."""
    if not key:
        raise ValueError("the API key is empty, which would let anyone in: give a non-empty key, or serve without one")
    if key != key.strip() or not key.isprintable():
        raise ValueError("the API key has leading or trailing spaces or control characters, which an HTTP "
                         "header cannot carry; choose another")


class OutputFormat(str, Enum):
    mask = "mask"        # palette PNG of class ids, the file ``fcnseg predict`` writes
    overlay = "overlay"  # JPEG of class colours blended over the photo
    json = "json"        # class names, pixel shares, optionally the mask and the uncertainty map


# Accept media types -> format, for clients that negotiate instead of passing ?format=
_ACCEPT = {"application/json": OutputFormat.json, "image/png": OutputFormat.mask, "image/jpeg": OutputFormat.overlay}


class ClientGone(Exception):
    """The client closed its connection before its request was read (nobody is left to answer)."""


class ServeError(Exception):
    """An HTTP error with a JSON body ``{"error": {"status", "code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status,
                        headers=headers)


def choose_format(requested: OutputFormat | None, accept: str | None) -> OutputFormat:
    """``?format=`` wins; else the first known type in Accept (quality factors ignored); else JSON."""
    if requested is not None:
        return requested
    for part in (accept or "").split(","):
        kind = part.split(";")[0].strip().lower()
        if kind in _ACCEPT:
            return _ACCEPT[kind]
    return OutputFormat.json


def model_info(name: str, seg: Segmenter) -> dict[str, Any]:
    """What ``GET /v1/models`` says about one loaded model: its classes, colours and recorded metrics."""
    record = seg.record or {}
    return {"name": name, "arch": record.get("arch"), "num_classes": seg.num_classes, "classes": list(seg.classes),
            "colors": seg.colors.tolist(), "metrics": record.get("metrics"), "sha256": record.get("sha256")}


def _png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def class_shares(mask: np.ndarray, seg: Segmenter) -> list[dict[str, Any]]:
    counts = np.bincount(mask.reshape(-1).astype(np.int64), minlength=seg.num_classes)[:seg.num_classes]
    total = max(1, int(mask.size))
    return [{"id": i, "name": name, "color": seg.colors[i].tolist(), "pixels": int(c), "share": float(c) / total}
            for i, (name, c) in enumerate(zip(seg.classes, counts))]


def entropy_png(probs, band_values: int = 4 << 20) -> bytes:
    """The normalised-entropy map of (K, H, W) probabilities as an 8-bit PNG, computed in bands of rows so
    that the float32 work copies hold at most ``band_values`` values at a time, whatever the image size."""
    from PIL import Image

    k, h, w = probs.shape
    rows = max(1, band_values // max(1, k * w))
    out = np.empty((h, w), np.uint8)
    for y in range(0, h, rows):
        out[y:y + rows] = to_png_array(normalized_entropy(probs[:, y:y + rows]))
    return _png_bytes(Image.fromarray(out, mode="L"))


def render(fmt: OutputFormat, name: str, seg: Segmenter, image, pred: Prediction, alpha: float,
           include_mask: bool) -> Response:
    """The response body for one prediction (runs in a worker thread: PNG/JPEG encoding is CPU work)."""
    mask = pred.mask.numpy()
    if fmt is OutputFormat.mask:
        return Response(_png_bytes(palette_image(mask, seg.colors)), media_type="image/png")
    if fmt is OutputFormat.overlay:
        buf = io.BytesIO()
        overlay(image, mask, seg.colors, alpha).save(buf, format="JPEG", quality=90)
        return Response(buf.getvalue(), media_type="image/jpeg")
    body: dict[str, Any] = {"model": name, "width": int(mask.shape[1]), "height": int(mask.shape[0]),
                            "classes": class_shares(mask, seg)}
    if include_mask:
        body["mask_png"] = _b64(_png_bytes(palette_image(mask, seg.colors)))
        body["mask_ids"] = _b64(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())  # row-major class ids
    if pred.probs is not None:
        body["uncertainty_png"] = _b64(entropy_png(pred.probs))
    return JSONResponse(body)


def create_app(models: dict[str, Segmenter], settings: ServeSettings | None = None) -> FastAPI:
    """An ASGI app serving ``models`` (name -> Segmenter; the first is the default) and the web page."""
    if not models:
        raise ValueError("create_app needs at least one model")
    settings = settings or ServeSettings()
    models = dict(models)  # the caller's dict stays theirs
    default_model = next(iter(models))
    metrics = ServeMetrics()
    batcher = _batcher_for(models, settings, metrics)
    in_flight = InFlight(settings.max_queue, settings.return_memory)
    metrics.in_flight.set_function(lambda: in_flight.count)
    # decoding and encoding images is CPU work too: a few threads at a time, so that a burst of uploads
    # neither starves the inference threads nor holds many decoded images at once
    codec_slots: list[anyio.CapacityLimiter] = []  # made in the lifespan, inside the server's event loop

    async def in_codec_thread(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=codec_slots[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        codec_slots[:] = [anyio.CapacityLimiter(settings.workers + 2)]
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()  # uvicorn has already let in-flight requests finish; this drains the rest

    app = FastAPI(title="fcnseg", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.batcher, app.state.metrics, app.state.models = settings, batcher, metrics, models
    app.state.in_flight = in_flight

    _add_middleware(app, settings, metrics)
    _add_error_handlers(app, settings, metrics)
    require_key = _key_check(settings)
    keyed = schema.errors(401) if settings.api_key else {}

    _add_status_routes(app, models, default_model, batcher, metrics, require_key, keyed)
    _add_segment_route(app, models, default_model, settings, batcher, in_flight, in_codec_thread, require_key, keyed)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _add_status_routes(app: FastAPI, models: dict[str, Segmenter], default_model: str, batcher: MicroBatcher,
                       metrics: ServeMetrics, require_key, keyed: dict) -> None:
    """The routes that describe the service: /healthz (open), /metrics and /v1/models (behind the key)."""

    @app.get("/healthz", response_model=schema.Health)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": list(models), "queue_depth": batcher.depth}

    @app.get("/metrics", dependencies=[Depends(require_key)], response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **keyed})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(require_key)], response_model=schema.ModelList, responses=keyed)
    async def list_models() -> dict[str, Any]:
        return {"default": default_model, "models": [model_info(n, s) for n, s in models.items()]}


def _add_segment_route(app: FastAPI, models: dict[str, Segmenter], default_model: str, settings: ServeSettings,
                       batcher: MicroBatcher, in_flight: InFlight, in_codec_thread, require_key, keyed: dict) -> None:
    """POST /v1/segment: admitted against --max-queue before the upload is read, decoded and encoded in the
    codec threads, segmented by the micro-batcher, all within the request's deadline."""

    @app.post("/v1/segment", dependencies=[Depends(require_key)], response_class=JSONResponse,
              openapi_extra={"requestBody": schema.IMAGE_BODY},
              responses={200: schema.SEGMENT_OK, **keyed,
                         **schema.errors(400, 404, 408, 413, 415, 422, 500, 503, 504)})
    async def segment(request: Request,
                      model: str | None = Query(None, description="a loaded model's name (default: the first)"),
                      format: OutputFormat | None = Query(None, description="mask, overlay or json (default: by Accept)"),  # noqa: A002
                      uncertainty: bool = Query(False, description="JSON: add the normalised-entropy map as a PNG"),
                      include_mask: bool = Query(False, description="JSON: add the mask (palette PNG and raw ids)"),
                      alpha: float = Query(0.5, ge=0.0, le=1.0, description="overlay colour weight")) -> Response:
        start = time.monotonic()
        deadline = start + settings.timeout_s  # the whole request, upload and decoding included
        name = model or default_model
        if name not in models:
            raise ServeError(404, "unknown_model", f"no model {clip(name)}; loaded: {', '.join(models)}")
        fmt = choose_format(format, request.headers.get("accept"))
        want_probs = fmt is OutputFormat.json and uncertainty
        batcher.check_capacity()  # refuse overload before reading and decoding the upload
        with in_flight.place():  # from here to the answer this request holds one of --max-queue places
            allowed = min(settings.body_timeout_s, deadline - time.monotonic())
            async with read_upload(request, settings, allowed) as upload:
                values = models[name].num_classes if want_probs else 1
                image = await in_codec_thread(decode_image, upload, settings.max_pixels, values)
            key = (name, image.size, want_probs)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"the upload alone took longer than {settings.timeout_s:g} s")
            pred = await batcher.submit(key, image, left)
            return await in_codec_thread(render, fmt, name, models[name], image, pred, alpha, include_mask)


class InFlight:
    """Requests admitted and not yet answered, uploads included: at most ``limit`` at once (past that, 503
    before a byte of the upload is read). With ``return_memory``, heap memory freed by a burst is handed
    back to the OS when the last of them is answered."""

    def __init__(self, limit: int, return_memory: bool = False) -> None:
        self.limit, self.return_memory = limit, return_memory
        self.count = 0
        self._trimming = False

    @contextmanager
    def place(self):
        if self.count >= self.limit:
            raise QueueFull(f"{self.count} requests are already in flight (limit {self.limit})")
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
            if not self.count and self.return_memory and not self._trimming:
                self._trimming = True  # one trim at a time, off the event loop (it walks the whole heap)
                done = asyncio.get_running_loop().run_in_executor(None, return_freed_memory)
                done.add_done_callback(self._trimmed)

    def _trimmed(self, _fut) -> None:
        self._trimming = False


def _batcher_for(models: dict[str, Segmenter], settings: ServeSettings, metrics: ServeMetrics) -> MicroBatcher:
    """The micro-batcher that runs ``models`` on batches of one key (model name, image size, probabilities
    wanted), its batch sizes and queue depth reported in ``metrics``."""

    def run_batch(key: Hashable, images: list) -> Sequence[Prediction]:
        name, _size, probs = key
        return models[name].predict(images, probs=probs)

    batcher = MicroBatcher(run_batch, max_batch=settings.max_batch, window_s=settings.batch_window_ms / 1000,
                           workers=settings.workers, max_queue=settings.max_queue,
                           on_batch=metrics.batch_size.observe)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    return batcher


def _add_middleware(app: FastAPI, settings: ServeSettings, metrics: ServeMetrics) -> None:
    """CORS where origins are set; request counts and latencies per route; the page's Content-Security-Policy."""
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or ("/static" if request.url.path.startswith("/static/") else "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        return response


def _add_error_handlers(app: FastAPI, settings: ServeSettings, metrics: ServeMetrics) -> None:
    """One JSON error shape for every refusal and failure, each counted by its code."""

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, exc: ServeError):
        metrics.rejects.labels(exc.code).inc()
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(UploadError)
    async def on_upload_error(request: Request, exc: UploadError):
        metrics.rejects.labels(exc.code).inc()
        # a body cut short or refused unread: close the connection rather than read the rest of it
        unread = {"Connection": "close"} if exc.status in (408, 413) else None
        return _error_response(exc.status, exc.code, exc.message, unread)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone):
        metrics.rejects.labels("client_disconnected").inc()
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s %s: %s disconnected during the upload, %s", request.method, request.url.path, client, exc)
        return Response(status_code=499)  # nobody reads it; the server drops it

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, exc: QueueFull):
        metrics.rejects.labels("queue_full").inc()
        return _error_response(503, "queue_full", f"server busy: {exc}; retry later",
                               {"Retry-After": str(settings.retry_after_s), "Connection": "close"})

    @app.exception_handler(ShuttingDown)
    async def on_shutting_down(request: Request, exc: ShuttingDown):
        metrics.rejects.labels("shutting_down").inc()
        return _error_response(503, "shutting_down", str(exc), {"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(DeadlineExceeded)
    async def on_deadline(request: Request, exc: DeadlineExceeded):
        metrics.rejects.labels("deadline").inc()
        return _error_response(504, "deadline_exceeded", f"segmentation took too long: {exc}")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        metrics.rejects.labels("invalid_request").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        # neither part echoes the request's values; cut anyway, as every message that names client input
        return _error_response(422, "invalid_request", f"{where[:80]}: {first.get('msg', 'invalid value')}"[:300])

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        metrics.rejects.labels("internal_error").inc()
        return _error_response(500, "internal_error", f"the server failed on this request ({type(exc).__name__})")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))


def _key_check(settings: ServeSettings):
    """The dependency that refuses a request without ``settings.api_key`` (none set: every request passes).
    With a key, the OpenAPI document names both ways to send it (its security schemes)."""
    if settings.api_key is None:
        def no_key() -> None:
            return None

        return no_key

    from fastapi.security import APIKeyHeader, HTTPBearer

    expected = settings.api_key.encode("utf-8")
    as_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key given to fcnseg serve")
    as_bearer = HTTPBearer(auto_error=False, description="the key given to fcnseg serve, as a bearer token")

    def require_key(request: Request, _header=Depends(as_header), _bearer=Depends(as_bearer)) -> None:
        # the header's bytes as sent (a UTF-8 key arrives as UTF-8 bytes; the parsed values above are
        # latin-1 text), compared in constant time
        raw = dict(request.headers.raw)
        given = raw.get(b"x-api-key", b"")
        auth = raw.get(b"authorization", b"")
        if not given and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest(given, expected):
            raise ServeError(401, "unauthorized", "missing or wrong API key (send it as X-API-Key or "
                                                  "Authorization: Bearer)", {"WWW-Authenticate": "Bearer"})

    return require_key


@asynccontextmanager
async def read_upload(request: Request, settings: ServeSettings, allowed_s: float):
    """The image of a multipart upload (its first file) or of a raw body, as a binary file rewound to its
    start: never more than ``settings.max_upload_bytes`` (413), all of it within ``allowed_s`` seconds
    (408), in memory up to ``settings.spool_bytes`` and in a temporary file beyond; closed on exit."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    envelope = limit + (MULTIPART_SLACK if ctype == "multipart/form-data" else 0)
    if declared is not None:
        try:
            declared = int(declared)
        except ValueError:
            raise UploadError(400, "bad_request", "Content-Length is not a number") from None
        if declared > envelope:  # refuse before reading a byte
            raise UploadError(413, "upload_too_large", f"upload of {declared} bytes is larger than the "
                                                       f"limit of {limit} bytes")
    received = [0]
    form = None
    try:
        with anyio.fail_after(allowed_s):
            if ctype != "multipart/form-data":
                upload = await spool_limited(request.stream(), limit, settings.spool_bytes, received)
            else:
                # starlette spools each file part to a temporary file above 1 MB itself
                parser = MultiPartParser(request.headers, limited_stream(request.stream(), envelope, received),
                                         max_files=1, max_fields=8, max_part_size=64 << 10)
                try:
                    form = await parser.parse()
                except MultiPartException as e:
                    raise UploadError(400, "bad_multipart", f"malformed multipart upload ({clip(e.message, 120)})") \
                        from None
                files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
                if not files:
                    raise UploadError(400, "missing_image", "the multipart upload holds no file; send the image as a "
                                                            "file field (e.g. -F image=@photo.jpg)")
                if (files[0].size or 0) > limit:
                    raise too_large(limit)
                upload = files[0].file
                upload.seek(0)
    except BaseException as e:
        if form is not None:
            await form.close()
        of = f"{received[0]} of {declared if declared is not None else 'an unstated number of'} bytes"
        if isinstance(e, TimeoutError):
            flag = "--body-timeout" if settings.body_timeout_s <= settings.timeout_s else "--timeout"
            raise UploadError(408, "body_timeout", f"the upload did not arrive within {allowed_s:.3g} s ({of} came; "
                                                   f"{flag} sets the limit)") from None
        if isinstance(e, ClientDisconnect):
            raise ClientGone(f"after {of}") from None
        raise
    try:
        yield upload
    finally:
        if form is not None:
            await form.close()
        else:
            upload.close()
