"""Checkpoints: safetensors + JSON record round trips, run directories, and .pth files that carry code."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fcnseg
from fcnseg.files import read_state_dict
from fcnseg.record import default_palette
from fcnseg.weights.checkpoint import make_record, read_record, save_checkpoint
from fcnseg.errors import FcnsegError

ARCH = "fcn32s_googlenet"  # a paper net small enough to build in a moment


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = fcnseg.build_model(ARCH, num_classes=4)
    with torch.no_grad():
        torch.nn.init.normal_(m.score_fr.weight, std=0.05)
    return m.eval()


def logits(m, seed=0):
    with torch.no_grad():
        return m(torch.randn(1, 3, 45, 61, generator=torch.Generator().manual_seed(seed)))


def test_round_trip_gives_a_ready_model(model, tmp_path):
    record = make_record(model, classes=["bg", "a", "b", "c"], metrics={"mean_iou": 0.5})
    path = save_checkpoint(model, tmp_path / "net", record)
    assert path == tmp_path / "net.safetensors" and (tmp_path / "net.json").is_file()
    assert json.loads((tmp_path / "net.json").read_text()) == read_record(path) == record
    loaded = fcnseg.load_checkpoint(path)
    assert not loaded.training and loaded.arch == ARCH and loaded.num_classes == 4
    assert loaded.record["classes"] == ["bg", "a", "b", "c"] and loaded.record["metrics"] == {"mean_iou": 0.5}
    assert len(loaded.record["colors"]) == 4
    assert loaded.record["normalization"]["mean"] == list(fcnseg.record.IMAGENET_MEAN)
    assert torch.equal(logits(loaded), logits(model))


def test_a_run_directory_loads_its_last_checkpoint(model, tmp_path):
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "last.safetensors")
    loaded = fcnseg.load_checkpoint(tmp_path / "run")
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(FcnsegError, match="checkpoints/last.safetensors"):
        fcnseg.load_checkpoint(tmp_path)


def test_half_precision_storage_loads_as_float32(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert read_record(path)["stored_dtype"] == "float16"
    assert os.path.getsize(path) < 0.6 * sum(p.numel() * 4 for p in model.parameters())
    loaded = fcnseg.load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_are_stored_in_the_asked_dtype(model, tmp_path, dtype):
    from safetensors.torch import load_file

    path = save_checkpoint(model, tmp_path / "w.safetensors", dtype=dtype)
    stored = load_file(str(path))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {dtype}
    want = {k: v.to(dtype) for k, v in model.state_dict().items()}
    assert all(torch.equal(stored[k], want[k]) for k in want)


def test_mistakes_are_fcnseg_errors(model, tmp_path):
    with pytest.raises(FcnsegError, match="no such checkpoint file"):
        fcnseg.load_checkpoint(tmp_path / "missing.safetensors")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(FcnsegError, match="fcnseg convert"):
        fcnseg.load_checkpoint(tmp_path / "weights.pth")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(FcnsegError, match="no fcnseg record"):
        fcnseg.load_checkpoint(tmp_path / "bare.safetensors")
    # a record that does not fit the weights (its own fields agree with each other)
    record = dict(make_record(model), num_classes=5, classes=list("abcde"), colors=default_palette(5))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bad.safetensors"),
              metadata={"fcnseg": json.dumps(record)})
    with pytest.raises(FcnsegError, match="weights do not fit"):
        fcnseg.load_checkpoint(tmp_path / "bad.safetensors")


def test_read_state_dict_accepts_plain_and_wrapped_state_dicts(model, tmp_path):
    state = model.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model_state_dict": state, "epoch": 3, "arch": "FCN32s"}, tmp_path / "wrapped.pth")
    for name in ("plain.pth", "wrapped.pth"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    torch.save({"a": 1}, tmp_path / "numbers.pth")
    with pytest.raises(FcnsegError, match="expected a state dict of tensors"):
        read_state_dict(tmp_path / "numbers.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(FcnsegError, match="not a readable PyTorch file|refused to load"):
        read_state_dict(tmp_path / "junk.pth")


# ---------------------------------------------------------------- pickles that carry code

class Payload:
    """Unpickling this calls open(marker, 'w'): it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_malicious(path, marker, zip_format: bool):
    obj = {"conv1_1.weight": torch.zeros(1), "payload": Payload(marker)}
    if zip_format:
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save", "pickle.dump"])
def test_a_pickle_that_carries_code_is_refused_and_never_runs(tmp_path, zip_format):
    # the payload is real: an unsafe load does create its marker
    proof = tmp_path / "proof"
    write_malicious(tmp_path / "proof.pth", proof, zip_format)
    if zip_format:
        torch.load(tmp_path / "proof.pth", weights_only=False)
    else:
        with open(tmp_path / "proof.pth", "rb") as f:
            pickle.load(f)
    assert proof.exists()

    marker = tmp_path / "pwned"
    evil = tmp_path / "fcn8s_from_caffe.pth"
    write_malicious(evil, marker, zip_format)
    with pytest.raises(FcnsegError, match="refused to load") as err:
        read_state_dict(evil)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fcnseg", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("zip_format", [True, False],
                         ids=["torch.save", "pickle.dump"])
@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_the_cli_refuses_it_in_one_line(tmp_path, zip_format):
    marker, evil, out = tmp_path / "pwned", tmp_path / "fcn8s_from_caffe.pth", tmp_path / "out"
    write_malicious(evil, marker, zip_format)
    proc = run_cli("convert", "--from", "torchfcn", evil, out)
    assert not marker.exists() and not out.with_suffix(".safetensors").exists()
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcnseg: error: ") and "refused to load" in lines[0], proc.stderr


def test_the_refusal_names_what_was_found_in_plain_text(tmp_path):
    write_malicious(tmp_path / "evil.pth", tmp_path / "pwned", zip_format=True)
    with pytest.raises(FcnsegError) as err:
        read_state_dict(tmp_path / "evil.pth")
    assert "\x1b" not in str(err.value) and "open" in str(err.value)


def test_atomic_write_leaves_no_partial_file_and_usual_permissions(tmp_path):
    from fcnseg.files import atomic_write

    target = tmp_path / "out.json"

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # as open(path, "w") would make it
