"""Checkpoints: safetensors weights plus a JSON record; safe reading of .pth files; built-in models.

A checkpoint ``NAME.safetensors`` carries its record in the file's metadata (key ``fcnseg``) and,
for people and tools, beside it as ``NAME.json``. The record says how to rebuild the network
(``arch``, ``num_classes``, ``model_kwargs``) and what its outputs mean (``classes``, ``colors``,
``normalization``), and where it came from (``provenance``, ``metrics``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .errors import FcnsegError, OutputExistsError, OutputWriteError, show_path
from .record import IMAGENET_MEAN, IMAGENET_STD, CheckpointRecord, default_palette

logger = logging.getLogger(__name__)
WEIGHTS_DIR = Path(__file__).parent / "weights"


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


def make_record(model: nn.Module, classes: list[str] | None = None, colors: list[list[int]] | None = None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, **extra: Any) -> dict[str, Any]:
    """The JSON record for ``model`` (built with ``build_model``), plus any extra fields; checked as
    every record read back will be (class names and colours must fit the model's classes)."""
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("model has no .arch: build it with fcnseg.build_model")
    num_classes = model.num_classes
    record = {
        "format": "fcnseg-checkpoint/1",
        "arch": arch,
        "num_classes": num_classes,
        "model_kwargs": dict(getattr(model, "build_kwargs", {})),
        "classes": list(classes) if classes else [f"class_{i}" for i in range(num_classes)],
        "colors": [list(map(int, c)) for c in colors] if colors else default_palette(num_classes),
        "normalization": {"mean": list(mean), "std": list(std)},
        "top_stride": int(getattr(model, "top_stride", 32)),
    }
    record.update(extra)
    return CheckpointRecord.parse(record, f"record of {arch}").to_dict()


def save_checkpoint(model: nn.Module, path: str | Path, record: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None, keep_float32: Sequence[str] = ()) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` record atomically. ``dtype`` (e.g. float16)
    stores floating tensors compactly; they are cast back to float32 on load. Tensors whose names
    start with one of ``keep_float32`` (e.g. ``"score_fr."``) are stored in float32 all the same."""
    from .outputs import output_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    output_file(path, what="checkpoint")
    output_file(path.with_suffix(".json"), what="checkpoint record")
    clean_stale_temps(path.parent)
    record = CheckpointRecord.parse(record, path).to_dict() if record is not None else make_record(model)
    if dtype is not None:
        record["stored_dtype"] = str(dtype).replace("torch.", "")
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point() and not k.startswith(tuple(keep_float32)):
            v = v.to(dtype)
        state[k] = v.contiguous()
    _write_checkpoint(path, state, record)
    return path


def _write_checkpoint(path: Path, state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """``path`` (tensors, the record in its metadata) and the record as ``.json`` beside it, each atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"fcnseg": json.dumps(record)}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def add_to_checkpoint_record(path: str | Path, fields: dict[str, Any]) -> None:
    """Add ``fields`` to the record of the checkpoint ``path`` (in the file and in the .json beside it); the
    tensors are written back unchanged, in the dtypes they are stored in."""
    from safetensors.torch import load_file

    path = Path(path)
    record = CheckpointRecord.parse({**read_record(path).to_dict(), **fields}, path).to_dict()
    _write_checkpoint(path, load_file(str(path)), record)


def read_record(path: str | Path) -> CheckpointRecord:
    """The checked record stored in a checkpoint's metadata (or in the .json beside it)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for damaged headers
        raise FcnsegError(f"{path}: not a readable safetensors checkpoint ({_first_line(e)})") from None
    if "fcnseg" in meta:
        return CheckpointRecord.from_json(meta["fcnseg"], path)
    side = path.with_suffix(".json")
    if side.is_file():
        if side.stat().st_size > (16 << 20):
            raise FcnsegError(f"{side}: too large to be a checkpoint record")
        return CheckpointRecord.from_json(side.read_bytes(), side)
    raise FcnsegError(f"{path}: no fcnseg record in the file or beside it ({side.name}); "
                      f"import foreign weights with 'fcnseg convert'")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a .safetensors file, from its header alone (nothing is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise FcnsegError(f"{path}: not a readable safetensors checkpoint ({_first_line(e)})") from None


def check_weights_fit(path: str | Path, record: CheckpointRecord) -> None:
    """The file's tensors must be exactly those of ``record``'s network, shape for shape: checked on a
    network built on the meta device (no memory, no initialisation) before anything real is built, so a
    record cannot ask for a network larger than the weights the file holds."""
    import torch

    from .registry import build_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = {k: tuple(v.shape) for k, v in build_model(record.arch, num_classes=record.num_classes,
                                                                  **record.model_kwargs).state_dict().items()}
    except FcnsegError:
        raise
    except Exception as e:  # a builder refusing its arguments (ValueError, TypeError, ...)
        raise FcnsegError(f"{path}: the record does not build {record.arch} ({_first_line(e)})") from None
    found = tensor_shapes(path)
    missing = [k for k in shapes if k not in found]
    unexpected = [k for k in found if k not in shapes]
    wrong = [f"{k} {found[k]} (expected {shapes[k]})" for k in shapes if k in found and found[k] != shapes[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} of other shape: {', '.join(wrong[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:3])}")
        raise FcnsegError(f"{path}: weights do not fit {record.arch} with {record.num_classes} classes "
                          f"({'; '.join(parts)})")


def builtin_checkpoints() -> dict[str, Path]:
    """Name -> file of the trained models shipped inside the package."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))}


def verify_builtin(path: Path) -> None:
    """A built-in checkpoint must match the sha256 in the JSON beside it (a damaged or swapped install)."""
    side = path.with_suffix(".json")
    try:
        expected = json.loads(side.read_text()).get("sha256")
    except (OSError, ValueError):
        expected = None
    if not isinstance(expected, str):
        raise FcnsegError(f"{side}: the built-in checkpoint's record has no sha256; reinstall fcnseg")
    if file_digest(path) != expected:
        raise FcnsegError(f"{path}: the built-in checkpoint does not match its sha256 ({expected[:12]}...); "
                          f"the file is damaged or was replaced: reinstall fcnseg")


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A built-in name, a checkpoint file, or a run directory (its last checkpoint)."""
    builtins = builtin_checkpoints()
    if isinstance(path_or_name, str) and path_or_name in builtins and not Path(path_or_name).exists():
        return builtins[path_or_name]
    path = Path(path_or_name)
    if path.is_dir():
        for cand in (path / "checkpoints" / "last.safetensors", path / "last.safetensors",
                     path / "checkpoints" / "best.safetensors", path / "best.safetensors"):
            if cand.is_file():
                return cand
        raise FcnsegError(f"{path}: a directory without checkpoints/last.safetensors; is it a training run?")
    if not path.is_file():
        names = ", ".join(builtins) or "none installed"
        raise FcnsegError(f"{path}: no such checkpoint file (built-in checkpoints: {names})")
    return path


def load_checkpoint(path_or_name: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A ready model in eval mode, with its checked record as ``model.record`` (a ``CheckpointRecord``).

    ``path_or_name``: a built-in name (``fcnseg models`` lists them; verified against its sha256),
    a ``.safetensors`` checkpoint, or a run directory. The record is checked field by field and the
    file's tensor shapes against the architecture before the network is built; the network is built
    without ImageNet weights and filled from the file alone: nothing else is read, nothing fetched.
    """
    from .registry import build_model

    path = resolve_checkpoint(path_or_name)
    if path.suffix != ".safetensors":
        raise FcnsegError(f"{path}: fcnseg checkpoints are .safetensors; convert other formats with 'fcnseg convert'")
    if path.parent == WEIGHTS_DIR:
        verify_builtin(path)
    record = read_record(path)
    check_weights_fit(path, record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(record.arch, num_classes=record.num_classes, **record.model_kwargs)
    state = read_state_dict(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes were checked; dtypes of integer buffers can still differ
        detail = " ".join(ln.strip() for ln in str(e).splitlines()[1:3])
        raise FcnsegError(f"{path}: weights do not fit {record.arch} ({detail[:300] or _first_line(e)})") from None
    model.record = record
    return model.to(device).eval()


BACKENDS = ("torch", "onnxruntime", "openvino")


def open_model(path_or_name: str | Path, backend: str | None = None, device: str | torch.device = "cpu",
               threads: int | None = None, dtype: str | torch.dtype | None = None):
    """A model ready for inference, from a checkpoint (a built-in name, a .safetensors file, a run
    directory: PyTorch) or an exported ``.onnx`` file (ONNX Runtime, the default backend for that suffix, or
    OpenVINO). Either has ``.record`` (a ``CheckpointRecord``; {} for a foreign ONNX file), ``.num_classes``
    and ``.top_stride``, and maps (B, C, H, W) float tensors to (B, K, H, W) logits.

    ``dtype`` is the compute type of a runtime backend, fixed when it opens the file: OpenVINO runs float32 or,
    for bfloat16, its bf16 inference precision; ONNX Runtime runs the exported float32 graph only. A PyTorch
    model opens in float32 whatever ``dtype`` says: ``optimize`` converts it (the Segmenter, evaluation)."""
    from .optimize import parse_dtype

    is_onnx = str(path_or_name).endswith(".onnx")
    backend = backend or ("onnxruntime" if is_onnx else "torch")
    if backend not in BACKENDS:
        raise FcnsegError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    dtype = parse_dtype(dtype)
    if backend != "torch":
        if not is_onnx:
            raise FcnsegError(f"{path_or_name}: the {backend} backend runs an exported .onnx model; "
                              f"make one with 'fcnseg export --format onnx'")
        from .export import OnnxRuntimeModel, OpenVinoModel

        if backend == "onnxruntime":
            if dtype != torch.float32:
                raise FcnsegError(f"{path_or_name}: ONNX Runtime runs the exported float32 model; for bfloat16 use "
                                  f"--backend openvino (its bf16 inference precision) or the PyTorch checkpoint")
            return OnnxRuntimeModel(path_or_name, threads=threads)
        return OpenVinoModel(path_or_name, threads=threads, precision="bf16" if dtype == torch.bfloat16 else "f32")
    if is_onnx:
        raise FcnsegError(f"{path_or_name}: an ONNX model runs with backend='onnxruntime' or 'openvino'")
    return load_checkpoint(path_or_name, device=device)
