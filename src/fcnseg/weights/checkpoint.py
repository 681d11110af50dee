"""Checkpoints: safetensors weights plus a JSON record; safe reading of .pth files; built-in models.

A checkpoint ``NAME.safetensors`` carries its record in the file's metadata (key ``fcnseg``) and,
for people and tools, beside it as ``NAME.json``. The record says how to rebuild the network
(``arch``, ``num_classes``, ``model_kwargs``) and what its outputs mean (``classes``, ``colors``,
``normalization``), and where it came from (``provenance``, ``metrics``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .. import models  # noqa: F401  (fills the model registry that records are checked against)
from ..errors import FcnsegError, show_path
from ..files import atomic_write, clean_stale_temps, file_digest, output_file, read_state_dict
from ..hardware import parse_dtype
from ..record import IMAGENET_MEAN, IMAGENET_STD, CheckpointRecord, default_palette
from ..registry import build_model

#: the built-in checkpoints ship in this folder, beside the code that reads them
WEIGHTS_DIR = Path(__file__).parent


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


def check_checkpoint_name(checkpoint: str) -> None:
    """A checkpoint that is neither an installed built-in name nor an existing file or folder gets one line,
    the same from every command ("no such checkpoint file" for a path), with a close match as "did you mean"."""
    import difflib

    path = Path(checkpoint)
    builtins = builtin_checkpoints()
    try:
        if checkpoint in builtins or path.exists():
            return
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: no such file either
        pass
    installed = ", ".join(builtins) or "none installed"
    if not any(c in checkpoint for c in "/\\."):  # a bare name: a built-in one
        close = difflib.get_close_matches(checkpoint, list(builtins), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise FcnsegError(f"built-in checkpoint {checkpoint!r} is not installed ({hint}built-in: {installed}); "
                          f"pass --checkpoint PATH to a .safetensors checkpoint, run directory or .onnx file")
    parent = path.parent
    try:
        near = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        near = []
    close = difflib.get_close_matches(path.name, near, n=1, cutoff=0.6)
    hint = f"; did you mean {show_path(parent / close[0])!r}?" if close else ""
    raise FcnsegError(f"{show_path(checkpoint)}: no such checkpoint file (built-in checkpoints: {installed}){hint}")


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
    is_onnx = str(path_or_name).endswith(".onnx")
    backend = backend or ("onnxruntime" if is_onnx else "torch")
    if backend not in BACKENDS:
        raise FcnsegError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    dtype = parse_dtype(dtype)
    if backend != "torch":
        if not is_onnx:
            raise FcnsegError(f"{path_or_name}: the {backend} backend runs an exported .onnx model; "
                              f"make one with 'fcnseg export --format onnx'")
        from .runtimes import OnnxRuntimeModel, OpenVinoModel

        if backend == "onnxruntime":
            if dtype != torch.float32:
                raise FcnsegError(f"{path_or_name}: ONNX Runtime runs the exported float32 model; for bfloat16 use "
                                  f"--backend openvino (its bf16 inference precision) or the PyTorch checkpoint")
            return OnnxRuntimeModel(path_or_name, threads=threads)
        return OpenVinoModel(path_or_name, threads=threads, precision="bf16" if dtype == torch.bfloat16 else "f32")
    if is_onnx:
        raise FcnsegError(f"{path_or_name}: an ONNX model runs with backend='onnxruntime' or 'openvino'")
    return load_checkpoint(path_or_name, device=device)


def checkpoint_heads(path_or_name: str | Path) -> dict[str, dict[str, list]] | None:
    """The heads a checkpoint's record lists (``{name: {classes, colors}}``), read without building anything;
    None for a single-head checkpoint or an exported .onnx file."""
    if str(path_or_name).endswith(".onnx"):
        return None
    path = resolve_checkpoint(path_or_name)
    return read_record(path).heads if path.suffix == ".safetensors" else None


def load_late_fusion(rgb: str | Path, hha: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A ``LateFusionFCN`` from two single-stream checkpoints (each trained on its own modality), with the RGB
    checkpoint's record and where both came from (``late_fusion``)."""
    from ..models.fusion import LateFusionFCN

    rgb_model, hha_model = load_checkpoint(rgb, device=device), load_checkpoint(hha, device=device)
    fused = LateFusionFCN(rgb_model, hha_model)
    classes = rgb_model.record.get("classes"), hha_model.record.get("classes")
    if classes[0] != classes[1]:
        raise FcnsegError(f"{rgb} and {hha} name their classes differently; late fusion sums scores class by class")
    fused.record = {**rgb_model.record, "late_fusion": {"rgb": str(rgb), "hha": str(hha)}}
    return fused
