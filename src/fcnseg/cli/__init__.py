"""The ``fcnseg`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module here with ``add_parser(subparsers)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings

from ..errors import FcnsegError, printable

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

# commands that run a model opt in to flushing subnormal floats, a process-wide switch that belongs to
# the program, not the library (see fcnseg.hardware.flush_denormal)
FLUSH_DENORMAL = {"predict", "evaluate", "benchmark", "serve"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcnseg", description="Fully Convolutional Networks for semantic segmentation.")
    from ..version import __version__

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


def stderr_line(text: str) -> None:
    """One line on stderr through ``tqdm.write``: a progress bar open at the time (a command's own, or one the
    library draws, such as the Ray job's or a training epoch's) is cleared and redrawn below the line, so the
    line never lands in the middle of the bar's text."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    stderr_line(f"fcnseg: warning: {printable(str(message))}")


class _LineHandler(logging.Handler):
    """The library's log records on stderr, each through ``stderr_line``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stderr_line(self.format(record))
        except Exception:  # logging's own rule: a record that cannot be shown never stops the program
            self.handleError(record)


class _LogFormat(logging.Formatter):
    """The library's log records as the CLI's stderr lines: the bare message; warnings as one-line warnings."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"fcnseg: warning: {msg}" if record.levelno >= logging.WARNING else msg


def add_progress_argument(p: argparse.ArgumentParser, default: str = "when stderr is a terminal") -> None:
    """The one progress flag of every command: --progress/--no-progress (None when neither is given)."""
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"progress bar (default: {default}); --no-progress: none")


def hold_output(args: argparse.Namespace, path, what: str = "--out") -> None:
    """Take the lock of the output ``path`` for the rest of the command (one writer per output; see
    fcnseg.files.OutputLock): a second writer is refused in one line naming the holder; a dead holder's lock is
    taken over with a message. Released when the command ends. In a distributed run only rank 0, the writer,
    holds it."""
    from ..files import OutputLock

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    lock = OutputLock(path, ["fcnseg", *getattr(args, "_argv", sys.argv[1:])], what=what,
                      on_takeover=lambda m: print(f"fcnseg: {printable(m)}", file=sys.stderr))
    stack = getattr(args, "_held", None)
    if stack is None:  # run(args) called without main(): held until the interpreter exits
        import atexit

        atexit.register(lock.release)
        lock.acquire()
    else:
        stack.enter_context(lock)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    # the library logs to "fcnseg"; the program shows those messages on stderr while the command runs
    handler = _LineHandler()
    handler.setFormatter(_LogFormat())
    lib_logger = logging.getLogger("fcnseg")
    level = lib_logger.level
    lib_logger.addHandler(handler)
    lib_logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as settings:
            warnings.showwarning = _one_line_warning
            args._held = settings  # output locks (hold_output) are released here, however the command ends
            if args.command in FLUSH_DENORMAL:
                from ..hardware import flush_denormal

                settings.enter_context(flush_denormal())
            code = args._run(args)
    except FcnsegError as e:
        # the last line of defence for the one-line format: a newline in a quoted file name is escaped
        print(f"fcnseg: error: {printable(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fcnseg: interrupted", file=sys.stderr)
        return 130
    finally:
        lib_logger.removeHandler(handler)
        lib_logger.setLevel(level)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
