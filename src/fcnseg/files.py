"""Places to write: checked before any work starts, and groups of files written all-or-nothing."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from .checkpoint import atomic_write
from .errors import FcnsegError, show_path


def output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder to write into: it is a folder (or can be created as one) in which files can be
    created. Creates nothing; raises a one-line ``FcnsegError`` naming ``what`` and the path otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FcnsegError(f"{what} {show_path(path)}: is a file, but a folder is needed; choose a folder name")
    _check_writable_folder(path if path.is_dir() else _nearest_existing(path, what), path, what)
    return path


def output_file(path: str | os.PathLike, what: str = "output file", overwrite: bool = True) -> Path:
    """``path`` as a file to write: not a folder, not read-only, not existing unless ``overwrite``, in a folder
    that exists or can be created and in which files can be created. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise FcnsegError(f"{what} {show_path(path)}: is a folder, but a file name is needed")
    if str(path).endswith(("/", os.sep)):
        raise FcnsegError(f"{what} {show_path(path)}: ends with a separator, but a file name is needed")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FcnsegError(f"{what} {show_path(path)}: exists already; choose another name or allow overwriting")
        if not os.access(path, os.W_OK):
            raise FcnsegError(f"{what} {show_path(path)}: exists and is read-only; not replacing it")
    parent = path.parent
    _check_writable_folder(parent if parent.is_dir() else _nearest_existing(parent, what), path, what)
    return path


def _nearest_existing(path: Path, what: str) -> Path:
    """The closest existing one of ``path`` and its ancestors (the folder to be created in); it must be a folder."""
    for parent in (path.absolute(), *path.absolute().parents):
        if parent.exists():
            if not parent.is_dir():
                raise FcnsegError(f"{what} {show_path(path)}: {show_path(parent)} is a file, so no folder can be "
                                  f"created under it")
            return parent
    raise FcnsegError(f"{what} {show_path(path)}: no existing folder above it")  # only on a vanished root


def _check_writable_folder(folder: Path, path: Path, what: str) -> None:
    """Files can be created in ``folder``: permissions first, then a real file (read-only mounts, immutable
    folders and ACLs that ``os.access`` does not see). The probe is named like atomic_write's temporaries,
    so one left by a killed process is cleaned up like them."""
    where = "" if folder == path else f" (in {show_path(folder)})"
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FcnsegError(f"{what} {show_path(path)}: no permission to create files{where}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fcnseg-probe.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise FcnsegError(f"{what} {show_path(path)}: cannot create files{where} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def write_group(files: Sequence[tuple[str | os.PathLike, Callable[[str], Any]]], overwrite: bool = False) -> list[Path]:
    """Write several files that belong together (a prediction and its overlay) all-or-nothing: each through
    ``atomic_write`` (exclusively unless ``overwrite``); if one fails or exists already, the ones written
    before it are removed and the error (``OutputExistsError``, ``OutputWriteError``, ...) is raised."""
    written: list[Path] = []
    try:
        for path, write in files:
            atomic_write(path, write, overwrite=overwrite)
            written.append(Path(path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
