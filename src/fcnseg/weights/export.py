"""Export for deployment: ONNX and TorchScript with dynamic height and width, a parity check against
the eager model, static int8 quantization of an exported ONNX model (``quantize_onnx``); the runtimes that
run an exported file are in ``fcnseg.weights.runtimes``.

The checkpoint record (classes, colours, normalization) travels inside the exported file: as ONNX
``metadata_props`` (key ``fcnseg``) or as a TorchScript extra file (``fcnseg.json``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import FcnsegError
from ..files import atomic_write, output_file
from ..modes import eval_mode
from ..record import CheckpointRecord, refuse_multihead
from .checkpoint import add_to_checkpoint_record
from .runtimes import METADATA_KEY

FORMATS = ("onnx", "torchscript")


def _record_of(model: nn.Module) -> dict[str, Any]:
    record = dict(getattr(model, "record", None) or {})
    record.setdefault("num_classes", int(model.num_classes))
    record["top_stride"] = int(getattr(model, "top_stride", 32))
    return record


def export_onnx(model: nn.Module, path: str | Path, example_size: tuple[int, int] = (256, 320),
                opset: int | None = None, record_extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (float32, eval) as ONNX with dynamic batch, height and width.

    Input ``image`` (B, 3, H, W) normalised float32; output ``logits`` (B, K, H, W). Uses PyTorch's
    ``torch.export``-based exporter (needs ``onnxscript``); the record, with ``record_extra`` added, goes into
    ``metadata_props``.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's backend)
    except ModuleNotFoundError as e:
        raise FcnsegError(f"ONNX export needs {e.name}: pip install 'fcnseg[onnx]'") from None
    refuse_multihead(model, "ONNX export")
    path = output_file(path, what="ONNX export")  # before the minutes of tracing
    x = torch.randn(1, 3, *example_size)
    auto = torch.export.Dim.AUTO  # the pooling and crop arithmetic is left to torch.export to work out
    # the exporter narrates its steps on stdout and logs sympy's failed attempts at simplifying
    # ceil-mode pooling sizes; neither is news to the user unless the export fails
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    narration = io.StringIO()
    try:
        shapes_log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(narration), eval_mode(model):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                        dynamic_shapes={"x": {0: auto, 2: auto, 3: auto}}, opset_version=opset,
                                        external_data=False, verbose=False)
    except Exception as e:
        raise FcnsegError(f"ONNX export failed: {str(e).strip().splitlines()[-1][:300]}") from e
    finally:
        shapes_log.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**_record_of(model), **(record_extra or {})})
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    return path


def calibration_batch(image, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A PIL image resized to ``size`` (H, W) and normalised: the (1, 3, H, W) float32 array that
    ``quantize_onnx`` calibrates on."""
    from PIL import Image

    h, w = size
    x = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), np.float32) / 255
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


# weights of the layers that score, upsample and fuse: few FLOPs, and their rounding shows in the logits directly
FLOAT_HEAD_PREFIXES = ("score", "up.", "final_up")


def _float_nodes(graph, keep_float: Sequence[str], only: Sequence[str], src: Path) -> list[str]:
    """Names of the nodes ``quantize_onnx`` leaves float32: the head (convolutions with a ``keep_float`` weight
    and everything downstream of them: fusion, crops), or with ``only`` every node but the convolutions whose
    weight starts with one of those prefixes."""
    weights = {t.name for t in graph.initializer}
    head = {n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")
            and any(i in weights and i.startswith(tuple(keep_float)) for i in n.input)}
    tainted = {o for n in graph.node if n.name in head for o in n.output}
    for n in graph.node:  # ONNX lists nodes in topological order
        if n.name not in head and any(i in tainted for i in n.input):
            head.add(n.name)
            tainted.update(n.output)
    if only:
        chosen = {n.name for n in graph.node if n.op_type == "Conv" and n.name not in head
                  and any(i in weights and i.startswith(tuple(only)) for i in n.input)}
        if not chosen:
            raise FcnsegError(f"{src}: no convolution has a weight named {' or '.join(only)}...; nothing to quantize")
        head = {n.name for n in graph.node if n.name not in chosen}
    return sorted(head)


def _weight_bits(bits: int | None) -> int:
    """7 or 8 as asked, or for None 8 where this CPU has VNNI and 7 elsewhere."""
    from ..hardware import vnni_cpu

    if bits is None:
        return 8 if vnni_cpu() else 7
    if bits not in (7, 8):
        raise FcnsegError(f"int8 weights use 7 or 8 bits, got {bits}")
    return bits


def quantize_onnx(src: str | Path, dst: str | Path, calibration: Iterable[np.ndarray],
                  keep_float: Sequence[str] = FLOAT_HEAD_PREFIXES, only: Sequence[str] = (),
                  weight_bits: int | None = None) -> Path:
    """Static int8 quantization of an exported float32 ONNX model, for ONNX Runtime on CPUs.

    Convolutions get int8 weights (per output channel, symmetric) and uint8 activations whose ranges
    are the minimum and maximum seen on ``calibration`` (normalised (B, 3, H, W) float32 arrays, a few
    dozen images from the deployment's own domain); the file stores QuantizeLinear/DequantizeLinear
    pairs (QDQ), which ONNX Runtime fuses into integer kernels. ``weight_bits`` 7 keeps the weights in 7 of
    their 8 bits, for x86 CPUs without VNNI, which multiply uint8 x int8 pairs with an instruction
    (vpmaddubsw) whose 16-bit sums saturate on full-range values; 8 uses the full range, half the rounding
    error, for CPUs with VNNI (and ARM). The default (None) picks by this CPU (``fcnseg.hardware.vnni_cpu``), so a
    file made for a VNNI CPU should be re-made for one without. Convolutions whose weight name starts with
    one of ``keep_float`` (the score and upsampling layers) and every node downstream of them (the fusion)
    stay float32. With ``only``,
    just the convolutions whose weight name starts with one of those prefixes are quantized, and
    everything else stays float32: ``only=("fc.",)`` makes VGG's fc6 and fc7 int8, 90% of its weights
    and 15% of its FLOPs, at a fraction of the accuracy cost of a whole int8 trunk. The record in the
    metadata is kept, with a ``quantization`` entry added. Quantizing trades accuracy for speed and
    memory: check the agreement on your own images (``fcnseg export --int8`` prints it).
    """
    try:
        import onnx
        import onnxruntime.quantization  # noqa: F401  (checked here, before any work; used by _quantize_static)
    except ModuleNotFoundError as e:
        raise FcnsegError(f"int8 quantization needs {e.name}: pip install 'fcnseg[onnx]'") from None
    weight_bits = _weight_bits(weight_bits)
    src, dst = Path(src), Path(dst)
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]
    if not batches:
        raise FcnsegError("int8 quantization needs at least one calibration image")
    source = onnx.load(str(src))
    input_name = source.graph.input[0].name
    float_nodes = _float_nodes(source.graph, keep_float, only, src)
    meta = {p.key: p.value for p in source.metadata_props}
    del source

    proto = _quantize_static(src, batches, input_name, float_nodes, weight_bits)
    record = json.loads(meta.get(METADATA_KEY, "{}"))
    record["quantization"] = {"kind": "int8 static (ONNX Runtime QDQ)",
                              "weights": f"int8 per channel, {weight_bits}-bit range", "weight_bits": weight_bits,
                              "activations": "uint8, min/max calibration", "calibration_batches": len(batches),
                              "float_nodes": len(float_nodes), "only": list(only)}
    _save_with_metadata(proto, {**meta, METADATA_KEY: json.dumps(record)}, dst)
    return dst


def _quantize_static(src: Path, batches: list[np.ndarray], input_name: str, float_nodes: list[str], weight_bits: int):
    """ONNX Runtime's static QDQ quantization of ``src`` calibrated on ``batches``; the quantized model proto."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.batches, None)
            return None if b is None else {input_name: b}

    with tempfile.TemporaryDirectory(prefix="fcnseg-quantize-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        try:  # the quantizer reports every step on the root logger and stdout
            root.setLevel(max(level, logging.ERROR))
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
                quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                                nodes_to_exclude=float_nodes, per_channel=True,
                                reduce_range=weight_bits == 7, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
        except Exception as e:  # onnxruntime raises its own exception types
            raise FcnsegError(f"{src}: int8 quantization failed ({str(e).strip().splitlines()[-1][:300]})") from e
        finally:
            root.setLevel(level)
        proto = onnx.load(str(quantized))
    return proto


def _save_with_metadata(proto, meta: dict[str, str], path: Path) -> None:
    """Write the ONNX ``proto`` to ``path`` atomically, its metadata replaced by ``meta``."""
    import onnx

    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


def export_torchscript(model: nn.Module, path: str | Path, example_size: tuple[int, int] = (256, 320)) -> Path:
    """Write ``model`` as a traced TorchScript module; the crops follow the input size at run time.

    Load it with ``torch.jit.load(path)``; the record is the extra file ``fcnseg.json``.
    """
    refuse_multihead(model, "TorchScript export")
    path = output_file(path, what="TorchScript export")
    x = torch.randn(1, 3, *example_size)
    with warnings.catch_warnings(), torch.no_grad(), eval_mode(model):
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints, which stay dynamic here
        traced = torch.jit.trace(model, x, check_trace=False)
    extra = {f"{METADATA_KEY}.json": json.dumps(_record_of(model))}

    def save(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the format was asked for by name
            torch.jit.save(traced, tmp, _extra_files=extra)

    atomic_write(path, save)
    return path


def export(model: nn.Module, path: str | Path, fmt: str, example_size: tuple[int, int] = (256, 320)) -> Path:
    if fmt == "onnx":
        return export_onnx(model, path, example_size)
    if fmt == "torchscript":
        return export_torchscript(model, path, example_size)
    raise FcnsegError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")


def add_to_record(path: str | Path, fields: dict[str, Any]) -> None:
    """Add ``fields`` to the record inside a written file: an fcnseg ONNX export (its metadata) or a safetensors
    checkpoint (its metadata and the .json beside it), each rewritten atomically. Used to keep what the precision
    gate measured with the file it measured."""
    path = Path(path)
    if path.suffix == ".safetensors":
        add_to_checkpoint_record(path, fields)
        return
    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    record = {**json.loads(meta.get(METADATA_KEY, "{}")), **fields}
    _save_with_metadata(proto, {**meta, METADATA_KEY: json.dumps(CheckpointRecord.parse(record, path).to_dict())},
                        path)


@torch.inference_mode()
def parity(reference: Callable[[torch.Tensor], torch.Tensor], candidate: Callable[[torch.Tensor], torch.Tensor],
           x: torch.Tensor) -> dict[str, float]:
    """Largest absolute logit difference and share of pixels whose class agrees, on input ``x``."""
    a = reference(x).float()
    b = candidate(x).float()
    if a.shape != b.shape:
        raise FcnsegError(f"exported model gives shape {tuple(b.shape)}, the model {tuple(a.shape)}")
    return {"max_abs_logit_diff": float((a - b).abs().max()),
            "class_agreement": float((a.argmax(1) == b.argmax(1)).float().mean())}
