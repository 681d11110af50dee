"""``fcnseg serve``: the HTTP service and web page (FastAPI + uvicorn) for one or more checkpoints."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve models over HTTP (POST /v1/segment) with a web page at /",
                       description="Serve checkpoints over HTTP: POST /v1/segment, GET /v1/models, /healthz, "
                                   "/metrics, and a web page at /. Binds to 127.0.0.1 unless told otherwise.")
    p.add_argument("--checkpoint", nargs="+", default=None, metavar="NAME|PATH|NAME=PATH",
                   help="models to load: built-in names, checkpoint paths or run directories, optionally named "
                        "NAME=PATH (default: every built-in model); the first is the default model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers-threads", type=int, default=1, metavar="N",
                   help="inference threads, each running one batch at a time (default 1)")
    p.add_argument("--max-batch", type=int, default=8, metavar="B",
                   help="most images of the same model and size run as one batch (default 8)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a request waits for companions of its size (default 5 ms)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="segmentation requests in flight (uploading, waiting or running) before 503 (default 64)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="per-request deadline in seconds, upload included, then 504 (default 30)")
    p.add_argument("--body-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="the whole upload must arrive within this many seconds, then 408 (default 15)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB, then 413 (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels, then 413 (default 40M)")
    p.add_argument("--api-key", default=None,
                   help="require this key (X-API-Key or Authorization: Bearer) on the API; default: "
                        "$FCNSEG_API_KEY if set")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin to call the API (repeatable; default: none)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute type (as predict)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="how much the server logs (default info: one line per request)")
    return p


def model_specs(checkpoints: list[str] | None) -> dict[str, str]:
    """Model name -> checkpoint, from the --checkpoint values (every built-in model by default)."""
    from ..weights.checkpoint import builtin_checkpoints
    from ..errors import FcnsegError

    if not checkpoints:
        names = list(builtin_checkpoints())
        if not names:
            raise FcnsegError("no built-in models are installed; pass --checkpoint PATH")
        return {n: n for n in names}
    specs: dict[str, str] = {}
    for value in checkpoints:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            name = Path(value.rstrip("/\\")).stem if any(c in value for c in "/\\.") else value
        if not name or not path:
            raise FcnsegError(f"--checkpoint {value!r}: expected NAME, PATH or NAME=PATH")
        if name in specs:
            raise FcnsegError(f"--checkpoint: two models are named {name!r}; name them with NAME=PATH")
        specs[name] = path
    return specs


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Fail before loading models when the address cannot be bound (uvicorn would exit with a log line)."""
    from ..errors import FcnsegError

    if not 0 < port < 65536:
        raise FcnsegError(f"--port {port}: expected 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise FcnsegError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") \
                from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..errors import FcnsegError
    from ..serve import ServeSettings, create_app
    from ..serve.app import check_api_key
    from .predict import load_segmenter

    api_key = args.api_key if args.api_key is not None else os.environ.get("FCNSEG_API_KEY")
    if api_key is not None:
        source = "--api-key" if args.api_key is not None else "$FCNSEG_API_KEY"
        try:
            check_api_key(api_key)
        except ValueError as e:  # an empty key must not quietly serve without one
            raise FcnsegError(f"{source}: {e}") from None
    for flag, value in (("--workers-threads", args.workers_threads), ("--max-batch", args.max_batch),
                        ("--max-queue", args.max_queue), ("--max-pixels", args.max_pixels)):
        if value < 1:
            raise FcnsegError(f"{flag} {value}: expected at least 1")
    for flag, value in (("--timeout", args.timeout), ("--body-timeout", args.body_timeout),
                        ("--max-upload-mb", args.max_upload_mb)):
        if not value > 0:
            raise FcnsegError(f"{flag} {value}: expected a positive number")
    if not args.batch_window_ms >= 0:
        raise FcnsegError(f"--batch-window-ms {args.batch_window_ms}: expected at least 0")
    try:
        settings = ServeSettings(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                                 workers=args.workers_threads, max_queue=args.max_queue, timeout_s=args.timeout,
                                 max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
                                 api_key=api_key, cors_origins=tuple(args.cors_origin),
                                 body_timeout_s=args.body_timeout, return_memory=True)
    except ValueError as e:
        raise FcnsegError(str(e)) from None
    specs = model_specs(args.checkpoint)
    check_port(args.host, args.port)
    if not is_loopback(args.host) and not api_key:
        print(f"fcnseg: warning: serving on {args.host} without --api-key: anyone who can reach this address "
              f"can use the service", file=sys.stderr)
    # the CLI's own predict settings (tiling, no test-time augmentation), so masks equal `fcnseg predict`'s;
    # batch_size = max_batch so that a micro-batch runs as one forward pass
    models = {name: load_segmenter(path, device=args.device, dtype=args.dtype, batch_size=args.max_batch)
              for name, path in specs.items()}
    app = create_app(models, settings)
    print(f"fcnseg: serving {', '.join(models)} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(1, int(args.timeout) + 5))
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop here
        pass
    print("fcnseg: server stopped", file=sys.stderr)
    return 0
