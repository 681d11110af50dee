"""Weight import: converted nets give the source network's logits for the same weights.

Oracle: the torchfcn package itself (wkentaro/pytorch-fcn) when it is installed, else an
independent copy of its architecture below, with its key names and its hard-coded crops
(19; 5, 27; 5, 9, 31). Caffe files are written here with a hand-rolled protobuf wire encoder
whose field numbers are typed from caffe.proto, independently of the reader's schema.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fcnseg
from fcnseg.weights import convert as cv
from fcnseg.cli import main
from fcnseg.errors import FcnsegError

ARCH_OF = {"FCN32s": "fcn32s_vgg16", "FCN16s": "fcn16s_vgg16", "FCN8s": "fcn8s_vgg16",
           "FCN8sAtOnce": "fcn8s_atonce_vgg16"}
N_CLASS = 21
INPUT_HW = (45, 61)  # odd, so every crop matters


# ---------------------------------------------------------------- the oracles

def import_torchfcn_models():
    """torchfcn.models without torchfcn/__init__.py, which imports its trainer and the chainer-based
    'fcn' package; the model files only use 'fcn' to download weights, so a stub stands in for it."""
    try:
        spec = importlib.util.find_spec("torchfcn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    saved = {k: v for k, v in sys.modules.items() if k == "fcn" or k == "torchfcn" or k.startswith("torchfcn.")}
    try:
        pkg = types.ModuleType("torchfcn")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchfcn"] = pkg
        sys.modules.setdefault("fcn", types.ModuleType("fcn"))
        import torchfcn.models as models  # noqa: PLC0415

        return {name: getattr(models, name) for name in ARCH_OF}
    except Exception:
        return None
    finally:
        for k in [k for k in sys.modules if k == "fcn" or k == "torchfcn" or k.startswith("torchfcn.")]:
            del sys.modules[k]
        sys.modules.update(saved)


TORCHFCN = import_torchfcn_models()

VGG_BLOCKS = [(1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512)]


class TorchfcnMirror(nn.Module):
    """torchfcn 1.9.7's FCN32s / FCN16s / FCN8s / FCN8sAtOnce: same parameter names, same forward.

    ``scales`` replaces the at-once net's fixed 0.01 / 0.0001 by (per-channel) tensors, to mirror a
    Caffe net whose Scale layers hold other values.
    """

    def __init__(self, variant: str, n_class: int = N_CLASS, scales: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.variant = variant
        c = 3
        for block, n, width in VGG_BLOCKS:
            for i in range(1, n + 1):
                setattr(self, f"conv{block}_{i}", nn.Conv2d(c, width, 3, padding=100 if block == i == 1 else 1))
                c = width
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.score_fr = nn.Conv2d(4096, n_class, 1)
        if variant != "FCN32s":
            self.score_pool4 = nn.Conv2d(512, n_class, 1)
            self.upscore2 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
        if variant in ("FCN8s", "FCN8sAtOnce"):
            self.score_pool3 = nn.Conv2d(256, n_class, 1)
            self.upscore_pool4 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
            self.upscore8 = nn.ConvTranspose2d(n_class, n_class, 16, stride=8, bias=False)
        elif variant == "FCN16s":
            self.upscore16 = nn.ConvTranspose2d(n_class, n_class, 32, stride=16, bias=False)
        else:
            self.upscore = nn.ConvTranspose2d(n_class, n_class, 64, stride=32, bias=False)
        self.scales = scales or ({4: 0.01, 3: 0.0001} if variant == "FCN8sAtOnce" else {4: 1.0, 3: 1.0})

    def _scale(self, x, pool):
        s = self.scales[pool]
        return x * (s.view(1, -1, 1, 1) if torch.is_tensor(s) else s)

    def forward(self, x):
        h, pools = x, {}
        for block, n, _ in VGG_BLOCKS:
            for i in range(1, n + 1):
                h = F.relu(getattr(self, f"conv{block}_{i}")(h))
            h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
            pools[block] = h
        h = F.relu(self.fc7(F.relu(self.fc6(h))))  # dropout: identity in eval
        h = self.score_fr(h)
        if self.variant == "FCN32s":
            return self.upscore(h)[:, :, 19:19 + x.size(2), 19:19 + x.size(3)]
        up = self.upscore2(h)
        s4 = self.score_pool4(self._scale(pools[4], 4))[:, :, 5:5 + up.size(2), 5:5 + up.size(3)]
        h = up + s4
        if self.variant == "FCN16s":
            return self.upscore16(h)[:, :, 27:27 + x.size(2), 27:27 + x.size(3)]
        up = self.upscore_pool4(h)
        s3 = self.score_pool3(self._scale(pools[3], 3))[:, :, 9:9 + up.size(2), 9:9 + up.size(3)]
        return self.upscore8(up + s3)[:, :, 31:31 + x.size(2), 31:31 + x.size(3)]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """Random weights for every layer any variant has, with scales that keep activations O(1..100)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        full = TorchfcnMirror("FCN8s")
        extra = TorchfcnMirror("FCN16s"), TorchfcnMirror("FCN32s")
    shapes = {k: v.shape for m in (full, *extra) for k, v in m.state_dict().items()}
    out = {}
    for key, shape in shapes.items():
        if key.endswith("bias"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif key.startswith("upscore"):  # deconvolutions: any full matrix, not just the bilinear init
            out[key] = torch.randn(shape, generator=g) / math.sqrt(shape[0] * 4)
        else:
            fan_in = math.prod(shape[1:])
            gain = 1.0 if key.startswith("score") else 2.0
            out[key] = torch.randn(shape, generator=g) * math.sqrt(gain / fan_in)
    return out


def reference(variant: str, weights, scales=None, use_torchfcn: bool = False) -> nn.Module:
    """The oracle net with ``weights`` (shared, not copied), in eval mode."""
    with torch.device("meta"):
        net = TORCHFCN[variant]() if use_torchfcn else TorchfcnMirror(variant, scales=scales)
    state = {k: weights[k] for k in net.state_dict()}
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def bgr_input(hw=INPUT_HW, seed=1) -> torch.Tensor:
    """What the sources eat: BGR pixels in 0-255 minus the mean."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *hw, generator=g) * 255 - torch.tensor(cv.MEAN_BGR).view(1, 3, 1, 1)


def compare(variant: str, model: nn.Module, ref: nn.Module, x_bgr: torch.Tensor) -> float:
    with torch.no_grad():
        want = ref(x_bgr)
        got = model(x_bgr.flip(1))  # fcnseg takes RGB
    assert got.shape == want.shape == (1, N_CLASS, *x_bgr.shape[-2:])
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{variant}: max |fcnseg - source| = {diff:.3g} (max |logit| {scale:.3g})")
    assert scale > 1.0 and want.std() > 0.01 * scale  # the comparison is not between near-constant maps
    assert diff <= 1e-5 * scale
    return diff


# ---------------------------------------------------------------- torchfcn

# one VGG16-sized conversion in the default run; the other three variants with -m slow
@pytest.mark.parametrize("variant", [pytest.param(v, marks=[] if v == "FCN8s" else pytest.mark.slow) for v in ARCH_OF])
def test_torchfcn_state_dict_gives_the_same_logits(variant, weights):
    ref = reference(variant, weights, use_torchfcn=TORCHFCN is not None)
    layers = cv.torchfcn_layers(ref.state_dict())
    model, unused = cv.build_from_layers(layers, "torchfcn", arch=ARCH_OF[variant])
    assert unused == []
    assert model.arch == ARCH_OF[variant] and model.num_classes == N_CLASS and not model.training
    assert all(p.requires_grad for p in model.parameters())  # ready to fine-tune
    compare(variant, model, ref, bgr_input())


@pytest.mark.slow  # two more VGG16-sized nets
@pytest.mark.torchfcn
def test_the_mirror_is_torchfcn(weights):
    for variant in ARCH_OF:
        with torch.device("meta"):
            real, mirror = TORCHFCN[variant](), TorchfcnMirror(variant)
        assert {k: v.shape for k, v in real.state_dict().items()} == \
               {k: v.shape for k, v in mirror.state_dict().items()}
    x = bgr_input(seed=2)
    with torch.no_grad():
        real = reference("FCN8sAtOnce", weights, use_torchfcn=True)(x)
        mirror = reference("FCN8sAtOnce", weights)(x)
    assert torch.equal(real, mirror)


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_cli_converts_a_torchfcn_file(weights, tmp_path):
    """End to end: torch.save'd state dict -> fcnseg convert -> load_checkpoint, fed RGB in [0, 1]
    normalised with the record's mean/std, gives the source's logits on the BGR mean-subtracted image."""
    ref = reference("FCN32s", weights)
    src = tmp_path / "fcn32s_from_caffe.pth"
    torch.save(ref.state_dict(), src)
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n")
    assert main(["convert", "--from", "torchfcn", "--classes-file", str(names), str(src), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out.safetensors").exists()  # "2 class names for a 21-class network"
    assert main(["convert", "--from", "torchfcn", "--arch", "fcn32s_vgg16", str(src), str(tmp_path / "voc")]) == 0
    voc = json.loads((tmp_path / "voc.json").read_text())
    assert voc["classes"][:2] == ["background", "aeroplane"] and "PASCAL VOC" in voc["provenance"]["classes"]
    (tmp_path / "voc.safetensors").unlink()
    names.write_text("\n".join(f"c{i}" for i in range(N_CLASS)) + "\n")
    assert main(["convert", "--from", "torchfcn", "--classes-file", str(names), str(src), str(tmp_path / "out")]) == 0
    src.unlink()
    model = fcnseg.load_checkpoint(tmp_path / "out.safetensors")
    rec = model.record
    assert rec == json.loads((tmp_path / "out.json").read_text())
    assert rec["arch"] == "fcn32s_vgg16" and rec["num_classes"] == N_CLASS and rec["classes"][3] == "c3"
    assert rec["provenance"]["source"] == "torchfcn" and len(rec["provenance"]["source_sha256"]) == 64
    assert "--classes-file" in rec["provenance"]["command"] and "classes" not in rec["provenance"]

    rgb01 = torch.rand(1, 3, *INPUT_HW, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(rec["normalization"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(rec["normalization"]["std"]).view(1, 3, 1, 1)
    x_bgr = rgb01.flip(1) * 255 - torch.tensor(cv.MEAN_BGR).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(x_bgr)
        got = model((rgb01 - mean) / std)
    diff = (got - want).abs().max().item()
    print(f"CLI FCN32s: max |fcnseg - source| = {diff:.3g} (max |logit| {want.abs().max().item():.3g})")
    assert diff <= 1e-4 * want.abs().max().item()  # float32 rounding of mean/std


# ---------------------------------------------------------------- caffe

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _blob_chunks(t: torch.Tensor, legacy: bool) -> list:
    data = memoryview(np.ascontiguousarray(t.detach().numpy(), dtype="<f4")).cast("B")
    if legacy:  # BlobProto num=1, channels=2, height=3, width=4
        dims = [1] * (4 - t.dim()) + list(t.shape)
        head = b"".join(_key(n, 0) + _varint(d) for n, d in zip((1, 2, 3, 4), dims))
    else:  # BlobProto shape=7 -> BlobShape dim=1 (packed int64)
        head = _bytes_field(7, _bytes_field(1, b"".join(_varint(d) for d in t.shape)))
    return [head, _key(5, 2) + _varint(len(data)), data]  # data=5, packed float


def write_caffemodel(path, layers: list[tuple[str, str, list[torch.Tensor]]], legacy: bool = False) -> None:
    """A NetParameter with ``layers`` (name, type, blobs): LayerParameter (name=1, type=2, bottom=3,
    blobs=7) in NetParameter.layer=100, or V1LayerParameter (name=4, type=5 enum, blobs=6) in layers=2."""
    v1_types = {"Convolution": 4, "Deconvolution": 39, "InnerProduct": 14, "ReLU": 18, "Pooling": 17}
    with open(path, "wb") as f:
        f.write(_bytes_field(1, b"test-net"))
        for name, kind, blobs in layers:
            if legacy:
                chunks = [_bytes_field(4, name.encode()), _key(5, 0) + _varint(v1_types[kind])]
                blob_field = 6
            else:  # with a bottom and a convolution_param the reader must skip
                chunks = [_bytes_field(1, name.encode()), _bytes_field(2, kind.encode()), _bytes_field(3, b"data"),
                          _bytes_field(106, _key(1, 0) + _varint(21))]
                blob_field = 7
            for blob in blobs:
                parts = _blob_chunks(blob, legacy)
                chunks += [_key(blob_field, 2) + _varint(sum(len(p) for p in parts)), *parts]
            f.write(_key(2 if legacy else 100, 2) + _varint(sum(len(c) for c in chunks)))
            for c in chunks:
                f.write(c)


def caffe_layer_list(ref: nn.Module, legacy: bool = False, scales: dict[int, torch.Tensor] | None = None):
    groups = cv.torchfcn_layers(ref.state_dict())
    out = [("relu1_1", "ReLU", []), ("pool1", "Pooling", [])]  # layers without weights are skipped
    for name, blobs in groups.items():
        kind = "Deconvolution" if name.startswith("upscore") else "Convolution"
        if legacy and name in ("fc6", "fc7"):  # InnerProduct as in a classifier: 2-D weights in 4-D legacy blobs
            kind, blobs = "InnerProduct", [blobs[0].reshape(blobs[0].shape[0], -1), blobs[1]]
        out.append((name, kind, blobs))
    for pool, s in (scales or {}).items():
        out.append((f"scale_pool{pool}", "Scale", [s]))
    return out


@pytest.mark.slow  # Caffe import of VGG16-sized nets
def test_caffe_at_once_model_with_scale_layers(weights, tmp_path):
    """The at-once net's Scale layers hold per-channel blobs; here they differ from 0.01 / 0.0001,
    so the converter must fold them into the skip scorers; the skips are weighted to matter."""
    g = torch.Generator().manual_seed(4)
    scales = {4: 0.01 * (0.5 + torch.rand(512, generator=g)), 3: 1e-4 * (0.5 + torch.rand(256, generator=g))}
    w = dict(weights, **{"score_pool4.weight": weights["score_pool4.weight"] * 100,
                         "score_pool3.weight": weights["score_pool3.weight"] * 1e4})
    ref = reference("FCN8sAtOnce", w, scales=scales)
    path = tmp_path / "fcn8s-atonce-pascal.caffemodel"
    write_caffemodel(path, caffe_layer_list(ref, scales=scales))
    layers = cv.read_layers(path, "caffe")
    path.unlink()
    model, unused = cv.build_from_layers(layers, "caffe")
    assert model.arch == "fcn8s_atonce_vgg16" and unused == []
    compare("caffe FCN8sAtOnce", model, ref, bgr_input())
    # the same weights as a plain FCN-8s (skip scale 1): the Scale layers fold in entirely
    plain, _ = cv.build_from_layers(layers, "caffe", arch="fcn8s_vgg16")
    compare("caffe FCN8sAtOnce as fcn8s_vgg16", plain, ref, bgr_input())
    with torch.no_grad():  # and the pool3 skip carries weight in this net
        x = bgr_input()
        without = reference("FCN8sAtOnce", w, scales={4: scales[4], 3: torch.zeros(256)})(x)
        assert (without - ref(x)).abs().max() > 1e-2 * ref(x).abs().max()


@pytest.mark.slow  # Caffe import of a VGG16-sized net
def test_caffe_legacy_v1_model(weights, tmp_path):
    """Old-style files: V1 'layers', legacy num/channels/height/width blobs, fc6/fc7 as InnerProduct."""
    ref = reference("FCN16s", weights)
    path = tmp_path / "fcn16s-legacy.caffemodel"
    write_caffemodel(path, caffe_layer_list(ref, legacy=True), legacy=True)
    model, _ = cv.convert(path, "caffe")
    path.unlink()
    assert model.arch == "fcn16s_vgg16"
    compare("caffe legacy FCN16s", model, ref, bgr_input(seed=5))


def test_caffe_reader_on_small_files(tmp_path):
    w = torch.arange(6.0).reshape(2, 3, 1, 1)
    path = tmp_path / "tiny.caffemodel"
    write_caffemodel(path, [("conv", "Convolution", [w, torch.tensor([0.5, -1.0])]), ("relu", "ReLU", [])])
    layers = cv.read_layers(path, "caffe")
    assert list(layers) == ["conv"] and torch.equal(layers["conv"][0], w)
    write_caffemodel(path, [("ip", "InnerProduct", [w.reshape(2, 3)])], legacy=True)
    assert cv.read_layers(path, "caffe")["ip"][0].shape == (1, 1, 2, 3)
    path.write_bytes(b"\x0a\xff\xff\xff\x0f")  # a field longer than the file
    with pytest.raises(FcnsegError, match="not a readable .caffemodel"):
        cv.read_layers(path, "caffe")
    path.write_bytes(b"")
    with pytest.raises(FcnsegError, match="no layer with weights"):
        cv.read_layers(path, "caffe")
    with pytest.raises(FcnsegError, match="no such file"):
        cv.read_layers(tmp_path / "missing.caffemodel", "caffe")


# ---------------------------------------------------------------- names, shapes and mistakes

def test_reference_names_are_derived_from_the_model():
    with torch.device("meta"):
        names = cv.reference_names(fcnseg.build_model("fcn8s_vgg16"))
    assert names["conv1_1"] == "backbone.features.0" and names["conv1_2"] == "backbone.features.2"
    assert names["conv3_3"] == "backbone.features.14" and names["conv5_3"] == "backbone.features.28"
    assert {k: v for k, v in names.items() if not k.startswith("conv")} == {
        "fc6": "fc.fc6", "fc7": "fc.fc7", "score_fr": "score_fr",
        "score_pool4": "score_skip.16", "upscore2": "up.16.deconv",
        "score_pool3": "score_skip.8", "upscore_pool4": "up.8.deconv", "upscore8": "final_up.deconv"}
    with torch.device("meta"):
        assert cv.reference_names(fcnseg.build_model("fcn16s_vgg16"))["upscore16"] == "final_up.deconv"
        assert cv.reference_names(fcnseg.build_model("fcn32s_vgg16"))["upscore"] == "final_up.deconv"
        with pytest.raises(FcnsegError, match="only the VGG16 FCNs"):
            cv.reference_names(fcnseg.build_model("fcn32s_alexnet"))
        with pytest.raises(FcnsegError, match="deconv"):
            cv.reference_names(fcnseg.build_model("fcn32s_vgg16", upsample="bilinear"))


def test_infer_arch():
    def layers(*names):
        return {n: [torch.zeros(1)] for n in names}

    assert cv.infer_arch(layers("score_fr", "upscore"), "torchfcn") == "fcn32s_vgg16"
    assert cv.infer_arch(layers("upscore2", "upscore16"), "caffe") == "fcn16s_vgg16"
    assert cv.infer_arch(layers("upscore8"), "caffe") == "fcn8s_vgg16"
    assert cv.infer_arch(layers("upscore8", "scale_pool4"), "caffe") == "fcn8s_atonce_vgg16"
    with pytest.raises(FcnsegError, match="--arch fcn8s_vgg16 or --arch fcn8s_atonce_vgg16"):
        cv.infer_arch(layers("upscore8"), "torchfcn")
    with pytest.raises(FcnsegError, match="not an FCN"):
        cv.infer_arch(layers("features.0", "classifier.0"), "torchfcn")


def test_fit_shapes():
    w = torch.randn(8, 2 * 3 * 3)
    assert torch.equal(cv._fit(w, torch.Size([8, 2, 3, 3]), "fc6"), w.reshape(8, 2, 3, 3))  # InnerProduct
    assert cv._fit(w.reshape(1, 1, 8, 18), torch.Size([8, 2, 3, 3]), "fc6").shape == (8, 2, 3, 3)  # legacy 4-D
    assert cv._fit(torch.randn(1, 1, 1, 21), torch.Size([21]), "bias").shape == (21,)
    with pytest.raises(FcnsegError, match=r"fc6: shape \(8, 18\) does not fit \(9, 2, 3, 3\)"):
        cv._fit(w, torch.Size([9, 2, 3, 3]), "fc6")
    with pytest.raises(FcnsegError, match="does not fit"):
        cv._fit(torch.randn(21, 21, 4, 4), torch.Size([21, 21, 8, 8]), "upscore2")


def test_user_mistakes_are_one_line_errors(weights, tmp_path):
    ref_layers = cv.torchfcn_layers(reference("FCN32s", weights).state_dict())
    with pytest.raises(FcnsegError, match="no score_pool4, upscore2, upscore16 for fcn16s_vgg16"):
        cv.build_from_layers(ref_layers, "torchfcn", arch="fcn16s_vgg16")
    with pytest.raises(FcnsegError, match="--num-classes 5 does not match the weights: score_fr has 21"):
        cv.build_from_layers(ref_layers, "torchfcn", num_classes=5)
    with pytest.raises(FcnsegError, match="cannot import reference weights into 'fcn32s_alexnet'"):
        cv.build_from_layers(ref_layers, "torchfcn", arch="fcn32s_alexnet")
    with pytest.raises(FcnsegError, match="unexpected key"):
        cv.torchfcn_layers({"conv1_1.running_mean": torch.zeros(1)})
    # torchvision's ImageNet VGG16 is not an FCN: the error names what was found
    torch.save({"features.0.weight": torch.zeros(1), "classifier.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    assert main(["convert", "--from", "torchfcn", str(tmp_path / "vgg.pth"), str(tmp_path / "o")]) == 1
    assert main(["convert", "--from", "caffe", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_data_parallel_prefix_is_stripped(weights):
    state = {f"module.{k}": v for k, v in reference("FCN32s", weights).state_dict().items()}
    assert set(cv.torchfcn_layers(state)) == {k.rpartition(".")[0][len("module."):] for k in state}
