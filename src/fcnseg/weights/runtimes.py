"""Runtimes for an exported ONNX file: ONNX Runtime and OpenVINO models called like the PyTorch model,
with the checkpoint record the file carries in its metadata; ``load_exported`` for ONNX and TorchScript."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import FcnsegError
from ..hardware import bf16_slowness
from ..record import CheckpointRecord

METADATA_KEY = "fcnseg"


def require_runtime(module: str, extra: str):
    """The runtime package ``module``, or a one-line error saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise FcnsegError(f"the {module} backend needs {module}: pip install 'fcnseg[{extra}]'") from None


def runtime_message(e: BaseException, limit: int = 300) -> str:
    """A runtime's exception as one short line: OpenVINO's "Exception from src/...cpp:84:" location lines,
    which come first and say nothing to a user, are dropped so that the reason itself is shown."""
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and not (ln.strip().startswith("Exception from ") and ln.strip().endswith(":"))]
    text = " ".join(lines) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _check_classes(path: Path, record, outputs) -> None:
    """A record that says K classes on a graph that scores another number is refused (masks with ids >= K)."""
    said = record.get("num_classes") if record else None
    if isinstance(said, int) and isinstance(outputs, int) and outputs != said:
        raise FcnsegError(f"{path}: its record says {said} classes but the graph outputs {outputs} channels; the "
                          f"file was altered or mislabelled: export it again")


def _onnx_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FcnsegError(f"{path}: no such ONNX file")
    return path


class OnnxRuntimeModel:
    """An exported ONNX model run by ONNX Runtime, called like the PyTorch model: (B, 3, H, W) -> logits.

    ``record``, ``num_classes`` and ``top_stride`` come from the file's metadata.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require_runtime("onnxruntime", "onnx")
        path = _onnx_file(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise FcnsegError(f"{path}: ONNX Runtime cannot load it ({runtime_message(e)})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        # an exported file carries its checkpoint's record; a foreign ONNX file has none
        self.record: CheckpointRecord | dict[str, Any] = (
            CheckpointRecord.from_json(meta[METADATA_KEY], path) if METADATA_KEY in meta else {})
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_outputs()[0].shape
        _check_classes(path, self.record, shape[1] if len(shape) > 1 else None)
        self.num_classes = int(self.record.get("num_classes") or (shape[1] if isinstance(shape[1], int) else 0))
        self.top_stride = int(self.record.get("top_stride", 32))
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # a foreign file may fix it
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch and x.shape[0] % self.fixed_batch == 0:
            # a graph with its batch size fixed (foreign exports often fix 1) runs the batch in pieces
            return torch.cat([self(part) for part in x.split(self.fixed_batch)])
        array = x.detach().float().cpu().contiguous().numpy()
        try:
            out = self.session.run(None, {self.input_name: array})[0]
        except Exception as e:  # onnxruntime's own exception types: a shape the graph does not take
            raise FcnsegError(f"{self.path}: ONNX Runtime cannot run it on input {list(array.shape)} "
                              f"({runtime_message(e)})") from None
        _check_classes(self.path, self.record, out.shape[1] if out.ndim > 1 else None)
        return torch.from_numpy(out)


class OpenVinoModel:
    """An exported ONNX model run by OpenVINO's CPU plugin, called like ``OnnxRuntimeModel``:
    (B, 3, H, W) -> logits, with ``record``, ``num_classes`` and ``top_stride`` from the file's metadata.

    OpenVINO compiles a model for one input shape; the compiled forms of the last ``shapes`` shapes are kept
    (a photo folder of one camera, or the tiles of ``Segmenter``, use one or two). ``precision`` is OpenVINO's
    inference precision for float layers: "f32" (the default: the exported model's own arithmetic) or "bf16"
    (on CPUs with native bf16). An int8 file from ``fcnseg export --int8`` runs its quantized layers in int8.
    """

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32", shapes: int = 4):
        ov = require_runtime("openvino", "openvino")
        path = _onnx_file(path)
        if precision not in ("f32", "bf16"):
            raise FcnsegError(f"OpenVINO precision must be f32 or bf16, got {precision!r}")
        slow = bf16_slowness() if precision == "bf16" else None
        if slow:
            warnings.warn(slow, RuntimeWarning, stacklevel=2)
        self.record = onnx_record(path)
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(str(path))
        except Exception as e:  # OpenVINO raises its own exception types for unreadable models
            raise FcnsegError(f"{path}: OpenVINO cannot load it ({runtime_message(e)})") from None
        self._config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._shapes = max(1, int(shapes))
        self._requests: dict[tuple[int, ...], Any] = {}  # input shape -> infer request, oldest first
        out = self._model.output(0).get_partial_shape()
        _check_classes(path, self.record, out[1].get_length() if out.rank.is_static and out.rank.get_length() > 1
                       and out[1].is_static else None)
        self.num_classes = int(self.record.get("num_classes") or (out[1].get_length() if out[1].is_static else 0))
        self.top_stride = int(self.record.get("top_stride", 32))
        self.path = path

    def _request(self, shape: tuple[int, ...]):
        request = self._requests.pop(shape, None)
        if request is None:
            model = self._model.clone()
            try:
                model.reshape(list(shape))
                request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            except Exception as e:
                raise FcnsegError(f"{self.path}: OpenVINO cannot run it on input {list(shape)} "
                                  f"({runtime_message(e)})") from None
            while len(self._requests) >= self._shapes:
                self._requests.pop(next(iter(self._requests)))
        self._requests[shape] = request  # the newest last
        return request

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        request = self._request(tuple(array.shape))
        try:
            request.infer({0: array})
        except Exception as e:  # OpenVINO's own exception types, led by a source location line
            raise FcnsegError(f"{self.path}: OpenVINO cannot run it on input {list(array.shape)} "
                              f"({runtime_message(e)})") from None
        out = request.get_output_tensor(0).data.copy()
        _check_classes(self.path, self.record, out.shape[1] if out.ndim > 1 else None)
        return torch.from_numpy(out)


def onnx_record(path: Path) -> CheckpointRecord | dict[str, Any]:
    """The checkpoint record an exported ONNX file carries in its metadata ({} for a foreign file)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's decode errors have no common public type
        raise FcnsegError(f"{path}: not a readable ONNX file ({str(e).strip().splitlines()[0][:200]})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    return CheckpointRecord.from_json(meta[METADATA_KEY], path) if METADATA_KEY in meta else {}


class OnnxRuntimeModule(nn.Module):
    """An ``OnnxRuntimeModel`` as an ``nn.Module`` (CPU), for code that calls ``.eval()`` and ``.train()``
    on its model, such as ``fcnseg.evaluation.loop.evaluate`` and ``TestTimeAugmentation``."""

    def __init__(self, runtime: OnnxRuntimeModel) -> None:
        super().__init__()
        self.runtime = runtime
        self.record = runtime.record
        self.num_classes = runtime.num_classes
        self.top_stride = runtime.top_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runtime(x)


def load_exported(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An exported file back as a callable: ONNX through ONNX Runtime, TorchScript through torch.jit."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxRuntimeModel(path)
    extra = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    text = extra[f"{METADATA_KEY}.json"]
    module.record = CheckpointRecord.from_json(text, path) if text else {}
    return module
