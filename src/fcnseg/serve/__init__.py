"""HTTP service and web page: ``create_app(models)`` is an ASGI app around ``fcnseg.inference.Segmenter``."""
from __future__ import annotations

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
