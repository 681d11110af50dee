"""Export: ONNX (run by ONNX Runtime) and TorchScript match the eager model at sizes other than the one
exported with, carry the record, and the onnxruntime backend of ``fcnseg predict`` gives the same masks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.weights.export import parity
from fcnseg.weights.runtimes import OnnxRuntimeModel, load_exported
from fcnseg.hardware import vnni_cpu
from tiny_models import random_image, run_cli, run_python, tiny_checkpoint, write_launcher

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One ONNX export through the command line (the exporter takes tens of seconds on 2 cores)."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(tmp / "tiny.safetensors")
    onnx_path = tmp / "tiny.onnx"
    code = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path), "--size", "96", "128"])
    assert code == 0
    return ckpt, onnx_path


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_onnx_export_parity_at_other_sizes(exported, capsys):
    ckpt, onnx_path = exported
    model = fcnseg.load_checkpoint(ckpt)
    runtime = OnnxRuntimeModel(onnx_path)
    for shape in [(1, 3, 96, 128), (2, 3, 77, 131), (1, 3, 200, 61)]:
        r = parity(model, runtime, torch.randn(*shape))
        assert r["max_abs_logit_diff"] < 1e-4 and r["class_agreement"] == 1.0, (shape, r)


def test_onnx_metadata_carries_the_record(exported):
    ckpt, onnx_path = exported
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    record = json.loads(meta["fcnseg"])
    assert record["classes"] == [f"thing{i}" for i in range(5)] and record["num_classes"] == 5
    assert record["colors"][1] == [40, 215, 97] and record["top_stride"] == 32
    assert OnnxRuntimeModel(onnx_path).record["normalization"] == fcnseg.load_checkpoint(ckpt).record["normalization"]


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_onnx_export_parity_of_a_real_light_model(tmp_path):
    """The built-in CamVid model (FCN-8s on EfficientNet-Lite0, a registered architecture with trained
    weights: batch norm, depthwise convolutions, ReLU6, three fused scores) exported to ONNX and run by ONNX
    Runtime matches eager PyTorch on photo-like images at the export size and at another size.

    Tolerance: 1e-4 of the logits' range. Both run float32; ONNX Runtime folds batch norm into the
    convolutions and sums in another order, which moves the last few bits of each logit (observed: under
    1e-6 of the range); a wrong crop, a missing layer or a size baked into the graph moves logits by a
    sizeable fraction of it.
    """
    from fcnseg.weights.export import export_onnx

    model = fcnseg.load_checkpoint("camvid")
    norm = model.record["normalization"]
    mean, std = torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)
    runtime = OnnxRuntimeModel(export_onnx(model, tmp_path / "camvid.onnx", example_size=(96, 128)), threads=1)
    for (h, w), seeds in [((96, 128), (1,)), ((77, 141), (2, 3))]:
        images = [np.asarray(random_image(h, w, s), np.float32).transpose(2, 0, 1) / 255 for s in seeds]
        x = (torch.from_numpy(np.stack(images)) - mean) / std
        with torch.no_grad():
            ref = model(x)
        spread = float(ref.max() - ref.min())
        r = parity(model, runtime, x)
        assert spread > 1.0 and r["max_abs_logit_diff"] < 1e-4 * spread, ((h, w), spread, r)
        assert r["class_agreement"] > 0.999, ((h, w), r)


def test_export_command_prints_parity(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "tiny.pt"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "torchscript", "--out", str(out),
                 "--size", "64", "80"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("parity")]
    assert len(lines) == 2 and all("class agreement 100.000%" in ln for ln in lines)
    assert "at 49x69 (batch 2)" in lines[1]  # a second, odd size: height and width are dynamic


def test_torchscript_export_parity_and_record(tmp_path, tiny_ckpt):
    model = fcnseg.load_checkpoint(tiny_ckpt)
    from fcnseg.weights.export import export_torchscript

    path = export_torchscript(model, tmp_path / "tiny.pt", example_size=(64, 96))
    scripted = load_exported(path)
    assert scripted.record["classes"][0] == "thing0"
    for shape in [(1, 3, 64, 96), (3, 3, 101, 37)]:
        r = parity(model, scripted, torch.randn(*shape))
        assert r["max_abs_logit_diff"] < 1e-5 and r["class_agreement"] == 1.0


def _predict_like_torch(ckpt, onnx_path, backend: str, tmp_path):
    """``fcnseg predict`` through ``backend`` gives torch's masks on a 90 x 117 photo; the photo's path."""
    src = tmp_path / "x.png"
    random_image(90, 117, 7).save(src)
    for name, model, out in [("torch", ckpt, tmp_path / "t"), (backend, onnx_path, tmp_path / backend)]:
        assert main(["predict", "--checkpoint", str(model), "--backend", name, str(src), "--out", str(out)]) == 0
    a, b = np.asarray(Image.open(tmp_path / "t" / "x.png")), np.asarray(Image.open(tmp_path / backend / "x.png"))
    assert a.shape == (90, 117) and (a == b).mean() > 0.999
    return src


def test_predict_with_onnxruntime_backend_matches_torch(exported, tmp_path):
    ckpt, onnx_path = exported
    src = _predict_like_torch(ckpt, onnx_path, "onnxruntime", tmp_path)
    seg = fcnseg.Segmenter.from_checkpoint(onnx_path)
    assert seg.classes[2] == "thing2" and seg(Image.open(src)).shape == (90, 117)


def test_onnxruntime_backend_needs_an_onnx_file(exported):
    ckpt, _ = exported
    with pytest.raises(fcnseg.errors.FcnsegError, match="fcnseg export"):
        fcnseg.Segmenter.from_checkpoint(ckpt, backend="onnxruntime")


# -- OpenVINO ---------------------------------------------------------------------------------------

@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
@pytest.mark.openvino
def test_openvino_backend_matches_the_eager_model(exported, tmp_path, capsys):
    """The same exported file run by OpenVINO: the eager model's logits at any size, the record from the file's
    metadata, compiled forms kept for the newest shapes only, and predict's masks equal to torch's."""
    from fcnseg.weights.runtimes import OpenVinoModel

    ckpt, onnx_path = exported
    model = fcnseg.load_checkpoint(ckpt)
    runtime = OpenVinoModel(onnx_path, threads=1, shapes=2)
    assert runtime.record["classes"][2] == "thing2" and runtime.num_classes == 5 and runtime.top_stride == 32
    for shape in [(1, 3, 96, 128), (2, 3, 77, 131), (1, 3, 200, 61), (1, 3, 96, 128)]:
        r = parity(model, runtime, torch.randn(*shape))
        assert r["max_abs_logit_diff"] < 1e-3 and r["class_agreement"] > 0.999, (shape, r)
    assert list(runtime._requests) == [(1, 3, 200, 61), (1, 3, 96, 128)]  # the oldest shape was let go

    src = _predict_like_torch(ckpt, onnx_path, "openvino", tmp_path)

    # user errors are one line each, before anything runs
    for argv, message in [
            (["predict", "--checkpoint", str(ckpt), "--backend", "openvino", str(src), "--out", str(tmp_path / "e")],
             "the openvino backend runs an exported .onnx model"),
            (["benchmark", "--model", str(tmp_path / "missing.onnx"), "--backend", "openvino"], "missing.onnx")]:
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf at all")
    with pytest.raises(fcnseg.errors.FcnsegError, match="broken.onnx: not a readable ONNX file"):
        OpenVinoModel(broken)


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
@pytest.mark.openvino
def test_openvino_opens_in_the_asked_precision(exported, tmp_path):
    """dtype bfloat16 opens an ONNX file in OpenVINO's bf16 inference precision (where the CPU has bf16 units, the
    compiled model says bf16 and its logits differ slightly from float32's); ONNX Runtime refuses it in one line.
    The bf16 compilations run in child processes (see ``tiny_models.run_python``)."""
    ckpt, onnx_path = exported
    proc = run_python(f"""
import json, torch
from fcnseg.weights.checkpoint import open_model
from fcnseg.errors import FcnsegError
from fcnseg.weights.export import parity
from fcnseg.hardware import native_bf16_cpu
f32 = open_model({str(onnx_path)!r}, backend="openvino", threads=1)
bf16 = open_model({str(onnx_path)!r}, backend="openvino", threads=1, dtype="bfloat16")
r = parity(f32, bf16, torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)))
hint = lambda m: str(m._requests[(1, 3, 96, 128)].get_compiled_model().get_property("INFERENCE_PRECISION_HINT"))
try:
    open_model({str(onnx_path)!r}, dtype="bfloat16")
    refused = ""
except FcnsegError as e:
    refused = str(e)
print(json.dumps(dict(r, native=native_bf16_cpu(), f32=hint(f32), bf16=hint(bf16), refused=refused)))
""")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class_agreement"] > 0.95 and got["f32"] == "<Type: 'float32'>", got
    if got["native"]:
        assert got["bf16"] == "<Type: 'bfloat16'>", got
        assert got["max_abs_logit_diff"] > 0, "bf16 logits equal float32's: the precision was not applied"
    assert "ONNX Runtime runs the exported float32 model" in got["refused"]

    # the command line: predict through OpenVINO bf16, torch's masks up to the odd pixel; ORT bf16 is one line
    src = tmp_path / "x.png"
    random_image(90, 117, 7).save(src)
    launcher = write_launcher(tmp_path / "launcher")
    for backend, dest, expected in [("openvino", tmp_path / "ov", 0), ("onnxruntime", tmp_path / "ort", 1)]:
        proc = run_cli(launcher, "predict", "--checkpoint", str(onnx_path), "--backend", backend, "--dtype",
                       "bfloat16", str(src), "--out", str(dest), timeout=300)
        assert proc.returncode == expected, proc.stderr
    err = proc.stderr
    assert "ONNX Runtime runs the exported float32 model" in err and "Traceback" not in err, err
    assert main(["predict", "--checkpoint", str(ckpt), str(src), "--out", str(tmp_path / "t")]) == 0
    a, b = np.asarray(Image.open(tmp_path / "t" / "x.png")), np.asarray(Image.open(tmp_path / "ov" / "x.png"))
    assert a.shape == b.shape == (90, 117) and (a == b).mean() > 0.95


# -- int8 -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """``fcnseg export --int8`` of the tiny model, calibrated on a folder of smooth images."""
    tmp = tmp_path_factory.mktemp("int8")
    ckpt = tiny_checkpoint(tmp / "tiny.safetensors")
    calib = tmp / "calib"
    calib.mkdir()
    for i in range(6):
        random_image(96, 128, 100 + i).save(calib / f"c{i}.png")
    out = tmp / "tiny-int8.onnx"
    code = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--size", "96", "128",
                 "--int8", "--calibrate", str(calib), "--calibrate-limit", "4", "--min-agreement", "0"])
    assert code == 0
    return ckpt, out


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_int8_export_quantizes_the_trunk_and_keeps_the_head_float(int8_export):
    import onnx
    from onnx import numpy_helper

    ckpt, path = int8_export
    proto = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    model = fcnseg.load_checkpoint(ckpt)
    trunk_convs = sum(isinstance(m, torch.nn.Conv2d) and not name.startswith(("score", "up.", "final_up"))
                      for name, m in model.named_modules())  # the backbone and fc6/fc7
    record = json.loads({p.key: p.value for p in proto.metadata_props}["fcnseg"])
    bits = record["quantization"]["weight_bits"]
    assert bits == (8 if vnni_cpu() else 7)
    int8_convs, float_head = 0, 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = node.input[1]
        dq = producers.get(w)
        if dq is not None and dq.op_type == "DequantizeLinear" and weights[dq.input[0]].dtype == np.int8:
            int8_convs += 1
            scale = weights[dq.input[1]]
            assert scale.ndim == 1 and scale.size > 1  # one scale per output channel
            assert np.abs(weights[dq.input[0]]).max() <= 2 ** (bits - 1)  # 7 or 8 bits, by this CPU
        else:
            assert w in weights and weights[w].dtype == np.float32 and w.startswith(("score", "up.", "final_up")), w
            float_head += 1
    assert int8_convs == trunk_convs == 7 and float_head == 6
    assert record["classes"][4] == "thing4" and record["quantization"]["calibration_batches"] == 4


def _int8_weights(path) -> list[str]:
    """Names of the convolution weights that an ONNX file stores in int8 (behind a DequantizeLinear)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    int8 = {t.name for t in proto.graph.initializer if numpy_helper.to_array(t).dtype == np.int8}
    producers = {o: n for n in proto.graph.node for o in n.output}
    names = []
    for node in proto.graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in int8:
            names.append(dq.input[0])
    return names


def test_int8_only_some_layers(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    from fcnseg.weights.export import quantize_onnx

    _, onnx_path = exported
    calib = [np.asarray(random_image(96, 128, s), np.float32).transpose(2, 0, 1)[None] / 255 for s in (1, 2)]
    out = quantize_onnx(onnx_path, tmp_path / "fc.onnx", calib, only=("fc.",))
    assert sorted(n.split("_quantized")[0] for n in _int8_weights(out)) == ["fc.fc6.weight", "fc.fc7.weight"]
    all_int8 = quantize_onnx(onnx_path, tmp_path / "all.onnx", calib)
    assert len(_int8_weights(all_int8)) == 7
    for bits, widest in ((7, 64), (8, 127)):  # per-channel symmetric: each channel's largest weight uses the range
        out = quantize_onnx(onnx_path, tmp_path / f"w{bits}.onnx", calib, only=("fc.",), weight_bits=bits)
        proto = onnx.load(str(out))
        stored = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in _int8_weights(out)]
        assert max(int(np.abs(w).max()) for w in stored) == widest
        record = json.loads({p.key: p.value for p in proto.metadata_props}["fcnseg"])
        assert record["quantization"]["weight_bits"] == bits and f"{bits}-bit" in record["quantization"]["weights"]
    with pytest.raises(fcnseg.errors.FcnsegError, match="7 or 8 bits, got 6"):
        quantize_onnx(onnx_path, tmp_path / "w6.onnx", calib, weight_bits=6)
    with pytest.raises(fcnseg.errors.FcnsegError, match="no convolution has a weight named nope"):
        quantize_onnx(onnx_path, tmp_path / "none.onnx", calib, only=("nope",))
    assert not (tmp_path / "none.onnx").exists()


@pytest.mark.openvino
def test_int8_model_runs_in_openvino_as_in_onnx_runtime(int8_export):
    from fcnseg.weights.runtimes import OpenVinoModel

    _, path = int8_export
    x = torch.randn(1, 3, 96, 128)
    r = parity(OnnxRuntimeModel(path), OpenVinoModel(path, threads=1), x)
    assert r["class_agreement"] > 0.98, r


def test_int8_model_runs_at_any_size_close_to_float(int8_export):
    ckpt, path = int8_export
    model = fcnseg.load_checkpoint(ckpt)
    runtime = OnnxRuntimeModel(path)
    for h, w, seed in [(96, 128, 1), (77, 141, 2)]:
        x = torch.from_numpy(np.asarray(random_image(h, w, seed), np.float32).transpose(2, 0, 1)[None] / 255)
        x = (x - 0.45) / 0.225
        ref, out = model(x).detach(), runtime(x)
        assert out.shape == ref.shape == (1, 5, h, w)
        # 8-bit activations through the trunk: errors of a few percent of the logits' range, not more
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.8


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_int8_export_prints_parity_and_gates_on_agreement(int8_export, tmp_path, capsys):
    ckpt, _ = int8_export
    calib = tmp_path / "c.png"
    random_image(64, 80, 3).save(calib)
    out = tmp_path / "gated.onnx"
    code = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--size", "64", "80",
                 "--int8", "--calibrate", str(calib), "--min-agreement", "1.01"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("int8 parity")]
    assert code == 1 and len(lines) == 2 and "class agreement" in lines[0]
    assert "less than --min-agreement 1.01" in captured.err and out.is_file()  # kept for inspection


@pytest.mark.parametrize("extra, message", [
    (["--format", "torchscript", "--int8", "--calibrate", "x.png"], "ONNX models only"),
    (["--format", "onnx", "--int8"], "go together"),
    (["--format", "onnx", "--int8-layers", "fc."], "add --int8"),
    (["--format", "onnx", "--int8-weight-bits", "8"], "--int8-weight-bits chooses how --int8 quantizes; add --int8"),
    (["--format", "onnx", "--int8", "--calibrate", "nothing-here/*.png"], "nothing-here/*.png: pattern matches no files"),
])
def test_int8_export_refuses_bad_requests(int8_export, tmp_path, capsys, extra, message):
    ckpt, _ = int8_export
    out = tmp_path / "never.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()
