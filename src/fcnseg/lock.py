"""One writer per output: an exclusive lock file beside the output that names its holder (PID, host, command)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from .errors import FcnsegError, show_path

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


def _alive(pid: int) -> bool:
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


def _describe(holder: dict) -> str:
    command = holder.get("command")
    cmd = " ".join(map(str, command)) if isinstance(command, list) else str(command or "?")
    if len(cmd) > 200:
        cmd = cmd[:200] + "..."
    return f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}: {cmd}"


def _read(path: Path) -> dict | None:
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
                    f"({_describe(holder)}); wait for it to finish, or choose another {self.what} "
                    f"(lock file {show_path(self.path)})")
            if self._remove_if_unchanged(holder):
                if self.on_takeover is not None:
                    self.on_takeover(f"{self.what} {show_path(self.output)}: taking over the lock of a process "
                                     f"that is gone ({why}; {_describe(holder)})")
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
            data = _read(self.path)
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
        return (not _alive(pid)), f"PID {pid} is not running"

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
            now = _read(self.path)
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
        data = _read(self.path)
        if data is not None and data.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
