"""User-facing errors: one line that names the file or value and says what to do next."""
from __future__ import annotations

import os
import unicodedata

# the usual short escapes; any other control or format character becomes \xNN / \uNNNN
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


class FcnsegError(Exception):
    """A mistake in the user's input (a file, a flag, a value). The CLI prints it on one line, no traceback."""


class OutputExistsError(FcnsegError):
    """A file that was to be created exists already (and overwriting was not asked for)."""


class OutputWriteError(FcnsegError):
    """Writing an output failed (disk full, no permission, read-only file system); nothing was left behind."""


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a message stays on one line whatever it quotes.
    Backslashes are escaped only when something else is, so ordinary Windows-style paths read as typed."""
    if all(not unicodedata.category(c).startswith("C") for c in text):
        return text
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif unicodedata.category(c).startswith("C"):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                       else f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return "".join(out)


def show_path(path: str | os.PathLike) -> str:
    """A path as it goes into a message: as typed, with control characters (a newline in a file name) escaped."""
    return printable(os.fsdecode(path))
