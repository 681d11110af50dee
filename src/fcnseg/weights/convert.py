"""Weight import: the paper's VGG16 FCNs from the torchfcn port (.pth) or the official Caffe models (.caffemodel).

Both sources name layers as the Caffe reference did (``conv1_1`` ... ``conv5_3``, ``fc6``, ``fc7``,
``score_fr``, ``score_pool4``, ``score_pool3``, ``upscore2``, ``upscore_pool4``, ``upscore8`` /
``upscore16`` / ``upscore``); the map from those names to fcnseg's modules is computed from the
model (VGG convolutions counted block by block, skips by stride), not typed in.

Both sources expect BGR pixels in 0-255 minus the ImageNet mean. fcnseg feeds RGB, so conv1_1's
input channels are reversed and the record's normalization is ``mean = MEAN_RGB / 255``,
``std = 1 / 255``: ``(x - mean) / std`` then equals the source's input exactly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..files import file_digest, read_state_dict
from .checkpoint import make_record, save_checkpoint
from ..errors import FcnsegError
from ..registry import build_model

SOURCES = ("torchfcn", "caffe")
ARCHS = ("fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "fcn8s_atonce_vgg16")
#: the mean both sources subtract (BGR order, 0-255), as in torchfcn and the Caffe reference's data layers
MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

#: reference layer name -> its blobs (weight, then bias if any)
Layers = dict[str, list[torch.Tensor]]


# ---------------------------------------------------------------- reading the sources

def torchfcn_layers(state: dict[str, torch.Tensor]) -> Layers:
    """Group a torchfcn state dict (``conv1_1.weight``, ``conv1_1.bias``, ...) by layer."""
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    layers: Layers = {}
    for key, value in state.items():
        layer, _, kind = key.rpartition(".")
        if kind not in ("weight", "bias") or not layer:
            raise FcnsegError(f"unexpected key {key!r}: torchfcn state dicts hold LAYER.weight / LAYER.bias")
        blobs = layers.setdefault(layer, [None, None])
        blobs[0 if kind == "weight" else 1] = value
    return {name: [b for b in blobs if b is not None] for name, blobs in layers.items()}


def _caffe_messages():
    """Message classes for the subset of caffe.proto that holds weights (field numbers as in BVLC caffe)."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError:
        raise FcnsegError("reading .caffemodel files needs the protobuf package: pip install 'fcnseg[caffe]'") from None
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="fcnseg_caffe_subset.proto", package="caffe", syntax="proto2")

    def message(name: str, fields: list[tuple]) -> None:
        m = proto.message_type.add(name=name)
        for fname, number, ftype, label, *type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".caffe.{type_name[0]}"
            if label == F.LABEL_REPEATED and ftype in (F.TYPE_FLOAT, F.TYPE_DOUBLE, F.TYPE_INT64):
                f.options.packed = True

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("BlobShape", [("dim", 1, F.TYPE_INT64, rep)])
    message("BlobProto", [("shape", 7, F.TYPE_MESSAGE, opt, "BlobShape"), ("data", 5, F.TYPE_FLOAT, rep),
                          ("double_data", 8, F.TYPE_DOUBLE, rep), ("num", 1, F.TYPE_INT32, opt),
                          ("channels", 2, F.TYPE_INT32, opt), ("height", 3, F.TYPE_INT32, opt),
                          ("width", 4, F.TYPE_INT32, opt)])
    message("LayerParameter", [("name", 1, F.TYPE_STRING, opt), ("type", 2, F.TYPE_STRING, opt),
                               ("blobs", 7, F.TYPE_MESSAGE, rep, "BlobProto")])
    message("V0LayerParameter", [("name", 1, F.TYPE_STRING, opt), ("type", 2, F.TYPE_STRING, opt),
                                 ("blobs", 50, F.TYPE_MESSAGE, rep, "BlobProto")])
    # 'type' is the LayerType enum in caffe.proto; read as its varint value, it needs no enum table
    message("V1LayerParameter", [("layer", 1, F.TYPE_MESSAGE, opt, "V0LayerParameter"),
                                 ("name", 4, F.TYPE_STRING, opt), ("type", 5, F.TYPE_INT32, opt),
                                 ("blobs", 6, F.TYPE_MESSAGE, rep, "BlobProto")])
    message("NetParameter", [("name", 1, F.TYPE_STRING, opt),
                             ("layers", 2, F.TYPE_MESSAGE, rep, "V1LayerParameter"),
                             ("layer", 100, F.TYPE_MESSAGE, rep, "LayerParameter")])
    pool = descriptor_pool.DescriptorPool()  # private pool: no clash with an installed pycaffe
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


def _blob_tensor(blob, where: str) -> torch.Tensor:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:  # legacy 4-D num x channels x height x width
        shape = tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))
    values = np.array(blob.data, dtype=np.float32) if len(blob.data) else np.array(blob.double_data, np.float32)
    if values.size != math.prod(shape):
        raise FcnsegError(f"{where}: blob of shape {shape} holds {values.size} values")
    return torch.from_numpy(values.reshape(shape))


def caffe_layers(data: bytes, where: str = "caffemodel") -> Layers:
    """The weight blobs of a serialized Caffe NetParameter (``layer``, or legacy ``layers``), by layer name."""
    from google.protobuf.message import DecodeError

    net_cls = _caffe_messages()
    try:
        net = net_cls.FromString(data)
    except DecodeError as e:
        raise FcnsegError(f"{where}: not a readable .caffemodel ({e})") from None
    layers: Layers = {}
    entries = [(lp.name, lp.blobs) for lp in net.layer]
    entries += [(lp.name or lp.layer.name, lp.blobs or lp.layer.blobs) for lp in net.layers]
    for name, blobs in entries:
        if len(blobs) and name not in layers:
            layers[name] = [_blob_tensor(b, f"{where}: layer {name}") for b in blobs]
    if not layers:
        raise FcnsegError(f"{where}: no layer with weights; is it a .caffemodel (not a .prototxt)?")
    return layers


def read_layers(path: str | Path, source: str) -> Layers:
    """Weights of ``path`` by reference layer name; ``source`` is 'torchfcn' (.pth) or 'caffe' (.caffemodel)."""
    path = Path(path)
    if source == "torchfcn":
        return torchfcn_layers(read_state_dict(path))
    if source == "caffe":
        if not path.is_file():
            raise FcnsegError(f"{path}: no such file")
        return caffe_layers(path.read_bytes(), str(path))
    raise FcnsegError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")


# ---------------------------------------------------------------- the name map

def reference_names(model: nn.Module) -> dict[str, str]:
    """Reference layer name -> fcnseg module name, for a VGG16 FCN with deconvolution upsampling."""
    from ..models.backbones import VGG16Backbone

    if not isinstance(getattr(model, "backbone", None), VGG16Backbone):
        raise FcnsegError(f"{getattr(model, 'arch', type(model).__name__)}: only the VGG16 FCNs have reference "
                          f"weights to import ({', '.join(ARCHS)})")
    names: dict[str, str] = {}
    block, index = 1, 1
    for i, m in enumerate(model.backbone.features):  # conv{block}_{index}; a pooling closes a block
        if isinstance(m, nn.Conv2d):
            names[f"conv{block}_{index}"] = f"backbone.features.{i}"
            index += 1
        elif isinstance(m, nn.MaxPool2d):
            block, index = block + 1, 1
    names.update(fc6="fc.fc6", fc7="fc.fc7", score_fr="score_fr")
    coarse = model.top_stride
    for s in model.skips:  # the skip at stride s is pool{log2 s}; it is fused with the 2x upsampled coarser score
        names[f"score_pool{int(math.log2(s))}"] = f"score_skip.{s}"
        names["upscore2" if coarse == model.top_stride else f"upscore_pool{int(math.log2(coarse))}"] = f"up.{s}.deconv"
        coarse = s
    names["upscore" if not model.skips else f"upscore{coarse}"] = "final_up.deconv"
    if model.final_up.mode != "deconv":
        raise FcnsegError("reference weights need upsample='deconv' (their upsampling layers are deconvolutions)")
    return names


def infer_arch(layers: Layers, source: str) -> str:
    """The fcnseg architecture whose layers these are."""
    if "upscore8" in layers:
        if "scale_pool4" in layers or "scale_pool3" in layers:
            return "fcn8s_atonce_vgg16"
        if source == "caffe":
            return "fcn8s_vgg16"
        raise FcnsegError("torchfcn's FCN8s and FCN8sAtOnce have the same layers; "
                          "pass --arch fcn8s_vgg16 or --arch fcn8s_atonce_vgg16")
    if "upscore16" in layers:
        return "fcn16s_vgg16"
    if "upscore" in layers:
        return "fcn32s_vgg16"
    raise FcnsegError(f"no upscore8 / upscore16 / upscore layer among {_names(layers)}: "
                      f"not an FCN-32s/16s/8s; pass --arch if the layers are named differently")


def _names(layers: Layers, limit: int = 12) -> str:
    names = list(layers)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} layers)" if len(names) > limit else "")


def _fit(blob: torch.Tensor, shape: torch.Size, where: str) -> torch.Tensor:
    """``blob`` as ``shape``: equal up to singleton axes (legacy 4-D blobs), or a fully connected
    O x (C*k*k) weight for an O x C x k x k convolution (fc6 / fc7 stored as InnerProduct)."""
    if blob.shape == shape:
        return blob
    squeezed = [d for d in blob.shape if d != 1]
    if squeezed == [d for d in shape if d != 1]:
        return blob.reshape(shape)
    if len(squeezed) == 2 and len(shape) == 4 and squeezed[0] == shape[0] and squeezed[1] == math.prod(shape[1:]):
        return blob.reshape(shape)  # Caffe and torchvision flatten C, H, W in that order
    raise FcnsegError(f"{where}: shape {tuple(blob.shape)} does not fit {tuple(shape)}")


def load_reference_layers(model: nn.Module, layers: Layers) -> list[str]:
    """Copy ``layers`` into ``model`` (all of its parameters); returns the names of source layers left unused.

    ``scale_pool4`` / ``scale_pool3`` (the at-once net's Caffe Scale layers) are folded into the
    skip scorers where they differ from the model's own skip scale.
    """
    names = reference_names(model)
    missing = [n for n in names if n not in layers]
    if missing:
        raise FcnsegError(f"no {', '.join(missing)} for {model.arch} among the source's layers ({_names(layers)})")
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for ref, mod in names.items():
        expected = [k for k in (f"{mod}.weight", f"{mod}.bias") if k in params]
        blobs = layers[ref]
        if len(blobs) != len(expected):
            raise FcnsegError(f"layer {ref}: {len(blobs)} blobs, {model.arch} expects {len(expected)} (weight, bias)")
        for key, blob in zip(expected, blobs):
            state[key] = _fit(blob.detach().float(), params[key].shape, f"layer {ref}")
    used = set(names)
    for s, k in zip(model.skips, model.skip_scales):
        ref = f"scale_pool{int(math.log2(s))}"
        if ref not in layers:
            continue
        used.add(ref)
        if len(layers[ref]) != 1:
            raise FcnsegError(f"layer {ref}: a Scale layer with a bias term is not supported")
        scale = layers[ref][0].detach().float().reshape(-1)
        channels = model.backbone.channels[s]
        if scale.numel() not in (1, channels):
            raise FcnsegError(f"layer {ref}: {scale.numel()} scales for {channels} channels")
        if not torch.equal(scale, torch.full_like(scale, k)):
            key = f"score_skip.{s}.weight"  # score(c * x) == (score.weight * c / k)(k * x)
            factor = (scale.double() / k).reshape(1, -1, 1, 1)
            state[key] = (state[key].double() * factor).float()
    first = f"{names['conv1_1']}.weight"
    state[first] = state[first].flip(1).contiguous()  # BGR -> RGB input channels
    model.load_state_dict(state, strict=True, assign=True)
    return [n for n in layers if n not in used]


# ---------------------------------------------------------------- conversion

def build_from_layers(layers: Layers, source: str, arch: str | None = None,
                      num_classes: int | None = None) -> tuple[nn.Module, list[str]]:
    """An fcnseg model (eval mode) holding ``layers``, and the source layers it did not use."""
    arch = arch or infer_arch(layers, source)
    if arch not in ARCHS:
        raise FcnsegError(f"cannot import reference weights into {arch!r}; valid architectures: {', '.join(ARCHS)}")
    if "score_fr" not in layers:
        raise FcnsegError(f"no score_fr layer among the source's layers ({_names(layers)})")
    found = int(layers["score_fr"][0].shape[0])
    if num_classes is not None and num_classes != found:
        raise FcnsegError(f"--num-classes {num_classes} does not match the weights: score_fr has {found} classes")
    with torch.device("meta"):  # no random initialisation of 134M parameters that are overwritten at once
        model = build_model(arch, num_classes=found)
    unused = load_reference_layers(model, layers)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise FcnsegError(f"{arch}: no weights for {', '.join(left)}")
    return model.eval(), unused


def convert(path: str | Path, source: str, arch: str | None = None,
            num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Import ``path`` (a torchfcn .pth or a Caffe .caffemodel): the model in eval mode and its provenance."""
    path = Path(path)
    layers = read_layers(path, source)
    model, unused = build_from_layers(layers, source, arch, num_classes)
    provenance = {
        "source": source,
        "source_file": path.name,
        "source_sha256": file_digest(path),
        "notes": "conv1_1 input channels reversed from BGR to RGB; the network expects 0-255 pixels minus "
                 "the ImageNet mean, which the record's normalization (mean/255, std 1/255) gives",
    }
    if unused:
        provenance["unused_layers"] = unused
    return model, provenance


def read_classes(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FcnsegError(f"{path}: no such classes file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def convert_file(path: str | Path, out: str | Path, source: str, arch: str | None = None,
                 num_classes: int | None = None, classes: Sequence[str] | None = None,
                 command: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Import ``path`` and write an fcnseg checkpoint ``out`` (.safetensors and .json record);
    returns the written path and the record."""
    model, provenance = convert(path, source, arch, num_classes)
    if classes is not None and len(classes) != model.num_classes:
        raise FcnsegError(f"{len(classes)} class names for a {model.num_classes}-class network")
    if classes is None and model.num_classes == 21:
        from ..data.voc import VOC_CLASSES  # every released 21-class FCN is a PASCAL VOC net

        classes = VOC_CLASSES
        provenance["classes"] = "assumed PASCAL VOC (21 classes); pass --classes-file if they are not"
    if command:
        provenance["command"] = command
    mean_rgb = tuple(m / 255 for m in reversed(MEAN_BGR))
    record = make_record(model, classes=list(classes) if classes else None, mean=mean_rgb, std=(1 / 255,) * 3,
                         provenance=provenance)
    return save_checkpoint(model, out, record), record
