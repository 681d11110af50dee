"""The ``fcnseg`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module here with ``add_parser(subparsers)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import FcnsegError

# subcommand -> module in this package; a module missing here (not yet written) is simply not offered
COMMANDS = {
    "models": "models",
    "demo": "demo",
    "convert": "convert",
    "data": "data",
    "train": "train",
    "evaluate": "evaluate",
    "predict": "predict",
    "export": "export",
    "benchmark": "benchmark",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcnseg", description="Fully Convolutional Networks for semantic segmentation.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fcnseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{module}":
                continue
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fcnseg: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            code = args._run(args)
    except FcnsegError as e:
        print(f"fcnseg: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fcnseg: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
