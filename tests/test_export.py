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
from fcnseg.export import OnnxRuntimeModel, load_exported, parity
from test_segmenter import random_image, tiny_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One ONNX export through the command line (the exporter takes tens of seconds on 2 cores)."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(tmp / "tiny.safetensors")
    onnx_path = tmp / "tiny.onnx"
    code = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path), "--size", "96", "128"])
    assert code == 0
    return ckpt, onnx_path


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


def test_export_command_prints_parity(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "tiny.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out),
                 "--size", "64", "80"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("parity")]
    assert len(lines) == 2 and all("class agreement 100.000%" in ln for ln in lines)
    assert "at 49x69 (batch 2)" in lines[1]  # a second, odd size: height and width are dynamic


def test_torchscript_export_parity_and_record(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    model = fcnseg.load_checkpoint(ckpt)
    from fcnseg.export import export_torchscript

    path = export_torchscript(model, tmp_path / "tiny.pt", example_size=(64, 96))
    scripted = load_exported(path)
    assert scripted.record["classes"][0] == "thing0"
    for shape in [(1, 3, 64, 96), (3, 3, 101, 37)]:
        r = parity(model, scripted, torch.randn(*shape))
        assert r["max_abs_logit_diff"] < 1e-5 and r["class_agreement"] == 1.0


def test_predict_with_onnxruntime_backend_matches_torch(exported, tmp_path):
    ckpt, onnx_path = exported
    src = tmp_path / "x.png"
    random_image(90, 117, 7).save(src)
    for backend, model, out in [("torch", ckpt, tmp_path / "t"), ("onnxruntime", onnx_path, tmp_path / "o")]:
        assert main(["predict", "--checkpoint", str(model), "--backend", backend, str(src), "--out", str(out)]) == 0
    a, b = np.asarray(Image.open(tmp_path / "t" / "x.png")), np.asarray(Image.open(tmp_path / "o" / "x.png"))
    assert a.shape == (90, 117) and (a == b).mean() > 0.999
    seg = fcnseg.Segmenter.from_checkpoint(onnx_path)
    assert seg.classes[2] == "thing2" and seg(Image.open(src)).shape == (90, 117)


def test_onnxruntime_backend_needs_an_onnx_file(exported):
    ckpt, _ = exported
    with pytest.raises(fcnseg.errors.FcnsegError, match="fcnseg export"):
        fcnseg.Segmenter.from_checkpoint(ckpt, backend="onnxruntime")
