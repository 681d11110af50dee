"""Places to write: checked before any work starts, and groups of files written all-or-nothing."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from .checkpoint import atomic_write
from .errors import FcnsegError, OutputExistsError, show_path


def output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder to write into: it is a folder (or can be created as one) in which files can be
    created. Creates nothing; raises a one-line ``FcnsegError`` naming ``what`` and the path otherwise."""
    path = Path(path)
    _refuse_dangling(path, what)
    if path.exists() and not path.is_dir():
        raise FcnsegError(f"{what} {show_path(path)}: is a file, but a folder is needed; choose a folder name")
    _check_writable_folder(path if path.is_dir() else _nearest_existing(path, what), path, what)
    return path


def output_file(path: str | os.PathLike, what: str = "output file", overwrite: bool = True) -> Path:
    """``path`` as a file to write: not a folder, not read-only, not existing unless ``overwrite``, in a folder
    that exists or can be created and in which files can be created. Creates nothing."""
    path = Path(path)
    _refuse_dangling(path, what)
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


def _refuse_dangling(path: Path, what: str) -> None:
    """A symlink whose target is missing can be neither written through nor created ("File exists")."""
    if path.is_symlink() and not path.exists():
        raise FcnsegError(f"{what} {show_path(path)}: a symlink to {show_path(os.readlink(path))}, which does not "
                          f"exist; create its target or remove the link")


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


def write_group(files: Sequence[tuple[str | os.PathLike, Callable[[str], Any]]], overwrite: bool = False,
                keep_identical: bool = False) -> list[Path]:
    """Write several files that belong together (a prediction and its overlay) all-or-nothing: each through
    ``atomic_write`` (exclusively unless ``overwrite``); if one fails or exists already, the ones written
    before it are removed and the error (``OutputExistsError``, ``OutputWriteError``, ...) is raised.

    ``keep_identical``: a file that exists already with exactly the bytes this write would give counts as
    written (and is left as it is): a retried job meets its own earlier complete outputs so, while a file
    with other content is still refused. Returns the files this call created."""
    written: list[Path] = []
    try:
        for path, write in files:
            try:
                atomic_write(path, write, overwrite=overwrite)
            except OutputExistsError:
                if not (keep_identical and _same_bytes(Path(path), write)):
                    raise
                continue
            written.append(Path(path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _same_bytes(path: Path, write: Callable[[str], Any]) -> bool:
    """Whether ``write`` would give exactly the bytes ``path`` holds (written to a temporary beside it)."""
    import filecmp

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        return filecmp.cmp(tmp, path, shallow=False)
    except OSError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
