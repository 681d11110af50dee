"""Writing files: every write atomic (``atomic_write``), places to write checked before any work starts,
groups of files written all-or-nothing, stale temporaries cleaned, file digests; tensor files read safely
(``read_state_dict``: safetensors, or .pth with ``weights_only=True``); and one writer per output
(``OutputLock``: an exclusive lock file beside the output that names its holder: PID, host, command)."""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import FcnsegError, OutputExistsError, OutputWriteError, show_path

logger = logging.getLogger(__name__)


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: os.umask can only be read by setting it, which is not thread-safe later on
_FILE_MODE = 0o666 & ~_umask()


# atomic_write's temporaries: ".NAME.XXXXXXXX.tmp" (tempfile's 8 random characters) beside the target
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_TEMP_S = 3600.0


def atomic_write(path: str | Path, write: Callable[[str], Any], overwrite: bool = True) -> None:
    """Write through ``write(tmp_path)`` to a temporary name in the same folder, fsync, then move into place.

    ``overwrite=True`` replaces an existing ``path`` (checkpoints replace last.safetensors). ``overwrite=False``
    creates it exclusively: the finished file is hard-linked to ``path``, which fails if the name exists, even
    when another process takes it at the same moment (``OutputExistsError``). The file gets the permissions a
    plain ``open(path, "w")`` would give, even when ``write`` replaced the temporary with a file of its own.
    An ``OSError`` (disk full, no permission, read-only file system) becomes a one-line ``OutputWriteError``
    naming ``path``; either way no temporary is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _FILE_MODE)
        os.close(fd)
        write(tmp)
        # safetensors' save_file creates its own file (owner-only) in place of the one made above
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                _link_new(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{show_path(path)}: exists already; not replaced") from None
    except OSError as e:
        raise OutputWriteError(f"{show_path(path)}: could not write ({e.strerror or e}); nothing was written") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _link_new(tmp: str, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path`` only if that name is free (atomic and race-free)."""
    try:
        os.link(tmp, path)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # a file system without hard links: claim the name exclusively, then move the finished file onto it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
        os.replace(tmp, path)


def clean_stale_temps(folder: str | Path, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove ``atomic_write`` temporaries (``.NAME.XXXXXXXX.tmp``) left in ``folder`` by a killed writer.

    Only files unmodified for ``older_than_s`` seconds (an hour) go: a live writer keeps its temporary's
    modification time fresh, so concurrent writers into the same folder are not disturbed. Returns the removed.
    """
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed  # nothing to clean in a folder that cannot be listed (yet)
    for entry in entries:
        if not _TMP_NAME.match(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # taken by another cleaner, or not ours to remove
    if removed:
        logger.info("removed %d stale temporary file(s) in %s", len(removed), show_path(folder))
    return removed


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    """Hex digest of a file, read in blocks (weights and archives can be gigabytes)."""
    import hashlib

    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors, or from .pth/.pt with ``weights_only=True`` (no code ever runs)."""
    path = Path(path)
    if not path.is_file():
        raise FcnsegError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise FcnsegError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols before refusing them
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FcnsegError(f"{path}: refused to load: the file holds Python objects other than tensors, which "
                          f"could run code ({_what_was_refused(str(e))}). Convert it to safetensors from a "
                          f"trusted source.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FcnsegError(f"{path}: not a readable PyTorch file ({str(e).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FcnsegError(f"{path}: expected a state dict of tensors")
    return obj


def _what_was_refused(message: str) -> str:
    """The global that torch's weights-only unpickler refused, in plain text."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", plain) or re.search(r"Unsupported operand \S+", plain)
    if found:
        return f"found {found.group(1) if found.groups() else found.group(0)}"
    lines = [ln.strip() for ln in plain.splitlines() if ln.strip() and "weights_only=False" not in ln]
    return lines[-1][:160] if lines else "unsupported content"


# -- one writer per output --------------------------------------------------------------------------------

# a lock file that holds no readable record is a holder killed between creating and filling it (a few
# microseconds) or a holder filling it right now: younger than this, it is taken as live
UNREADABLE_GRACE_S = 5.0


class OutputLockedError(FcnsegError):
    """Another process holds the output's lock."""


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of ``output`` (a folder or a file): ``.NAME.fcnseg-lock`` beside it, so a folder that must
    be new or empty stays so; inside an existing folder whose parent cannot be written (``--out ~``).
    Symlinks are followed, so two spellings of one output share one lock."""
    target = Path(os.path.abspath(output)).resolve()
    if target.is_dir() and (target.parent == target or not os.access(target.parent, os.W_OK | os.X_OK)):
        return target / ".fcnseg-lock"
    return target.parent / f".{target.name}.fcnseg-lock"


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _describe_holder(holder: dict) -> str:
    command = holder.get("command")
    cmd = " ".join(map(str, command)) if isinstance(command, list) else str(command or "?")
    if len(cmd) > 200:
        cmd = cmd[:200] + "..."
    return f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}: {cmd}"


def _read_holder(path: Path) -> dict | None:
    """The holder's record, or None when the file holds none (yet)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


class OutputLock:
    """An exclusive lock on one output, as a context manager: ``with OutputLock(out, command): ...``.

    Entering creates the lock file with O_CREAT|O_EXCL and writes ``{"pid", "host", "command", "started",
    "token"}``; a lock held by a live process raises ``OutputLockedError`` naming it; a lock whose process is
    gone from this host (killed) is taken over and ``on_takeover`` is told so in one line. Leaving removes the
    file if it is still this lock's. A lock from another host is never judged stale: only its owner can say.
    """

    def __init__(self, output: str | os.PathLike, command: list[str] | None = None,
                 what: str = "output", on_takeover: Callable[[str], None] | None = None):
        self.output = Path(output)
        self.path = lock_path(output)
        self.what = what
        self.on_takeover = on_takeover
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "command": list(command) if command is not None else list(sys.argv),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}
        self.held = False

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # each round either creates the lock, refuses, or removes a stale one
            if self._create():
                self.held = True
                return self
            holder = self._holder()
            if holder is None:
                continue  # it went away meanwhile: try again
            stale, why = self._stale(holder)
            if not stale:
                raise OutputLockedError(
                    f"{self.what} {show_path(self.output)} is being written by another fcnseg process "
                    f"({_describe_holder(holder)}); wait for it to finish, or choose another {self.what} "
                    f"(lock file {show_path(self.path)})")
            if self._remove_if_unchanged(holder):
                if self.on_takeover is not None:
                    self.on_takeover(f"{self.what} {show_path(self.output)}: taking over the lock of a process "
                                     f"that is gone ({why}; {_describe_holder(holder)})")
        raise OutputLockedError(f"{self.what} {show_path(self.output)}: could not take its lock "
                                f"{show_path(self.path)}; remove the file if no fcnseg process is writing there")

    def _create(self) -> bool:
        # the record is written first and hard-linked into place (link fails if the name exists, as O_EXCL does),
        # so a lock file never exists without its record; filesystems without hard links fall back to O_EXCL
        tmp = self.path.with_name(f"{self.path.name}.{self.record['token']}.tmp")
        try:
            tmp.write_text(json.dumps(self.record), encoding="utf-8")
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise FcnsegError(f"{self.what} {show_path(self.output)}: cannot create its lock file "
                              f"{show_path(self.path)} ({e.strerror or e})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.record, f)
        return True

    def _holder(self) -> dict | None:
        """The present holder's record; an unreadable file gets a moment to be filled, then counts as a holder
        with no record (stale once old). None when the file is gone."""
        deadline = time.monotonic() + 1.0
        while True:
            data = _read_holder(self.path)
            if data is not None:
                return data
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if time.monotonic() > deadline:
                return {"unreadable": True, "age": age}
            time.sleep(0.05)

    @staticmethod
    def _stale(holder: dict) -> tuple[bool, str]:
        if holder.get("unreadable"):
            return holder["age"] > UNREADABLE_GRACE_S, "its lock file holds no record"
        if holder.get("host") != socket.gethostname():
            return False, ""
        pid = holder.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return True, "its lock file names no process"
        return (not _process_alive(pid)), f"PID {pid} is not running"

    def _remove_if_unchanged(self, holder: dict) -> bool:
        """Remove the stale lock, unless another process took it over first: a takeover is serialised by a
        second O_EXCL file, and the lock is re-read under it."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a guard left by a process killed mid-takeover (microseconds) is cleared after a while
                if time.time() - guard.stat().st_mtime > UNREADABLE_GRACE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        os.close(fd)
        try:
            now = _read_holder(self.path)
            same = (now == holder) if not holder.get("unreadable") else (now is None and self.path.exists())
            if same:
                self.path.unlink(missing_ok=True)
            return same
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        data = _read_holder(self.path)
        if data is not None and data.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
