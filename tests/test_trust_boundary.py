"""Trust boundary: hostile checkpoints and damaged data files give one-line errors and nothing else.

The fuzz test generates hostile or malformed checkpoints (tampered records of every kind, truncated
and tampered safetensors headers, pickles under every extension) and damaged dataset files, and runs
fcnseg on each in a child process (tests/fuzz_child.py) under an address-space limit, with a counting
HTTP proxy on 127.0.0.1 in the proxy variables and a torch hub cache whose ImageNet files are pickles
that would run a command. It asserts: no traceback, exit 1 with one line, no command run (a marker
file), no request reached the proxy, no connection attempted, no allocation past the limit.
"""
from __future__ import annotations

import http.server
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fcnseg
from fcnseg.weights.checkpoint import save_checkpoint
from fcnseg.errors import FcnsegError
from fcnseg.record import CheckpointRecord

HERE = Path(__file__).parent
# file names torchvision's ImageNet weights have in the torch hub cache
HUB_FILES = ("alexnet-owt-7be5be79.pth", "vgg16-397923af.pth", "googlenet-1378be20.pth",
             "resnet18-f37072fd.pth", "resnet50-0676ba61.pth")


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CountingProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 that counts every request (CONNECT included) and forwards none."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _count(self) -> None:
                proxy.requests.append(f"{self.command} {self.path}")
                self.send_error(403, "counting proxy: no network in tests")

            do_GET = do_POST = do_HEAD = do_CONNECT = _count  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def proxy():
    server = CountingProxy()
    yield server
    server.shutdown()
    server.server_close()


def poisoned_torch_home(root: Path, marker: Path) -> Path:
    hub = root / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    for name in HUB_FILES:
        torch.save({"state_dict": Payload(marker)}, hub / name)
    return root


# ----------------------------------------------------------------------------------------- cases

TINY_ARCH = "fcn32s_efficientnet_lite0"


def _meta_file(path: Path, metadata: str | None, tensors: dict | None = None) -> Path:
    save_file(tensors or {"x": torch.zeros(1)}, str(path), metadata={"fcnseg": metadata} if metadata is not None else None)
    return path


def _safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _onnx_with_record(path: Path, record_text: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "fcnseg", record_text
    onnx.save(model, str(path))
    return path


def hostile_checkpoints(d: Path, marker: Path, good: Path) -> list[tuple[str, Path]]:
    """(name, file) for every hostile checkpoint; ``good`` is a valid checkpoint of TINY_ARCH."""
    d.mkdir()
    base = {"format": "fcnseg-checkpoint/1", "arch": "fcn32s_alexnet", "num_classes": 2, "model_kwargs": {}}
    records = {
        "pretrained_true": {**base, "model_kwargs": {"pretrained": True}},
        "pretrained_imagenet": {**base, "model_kwargs": {"pretrained": "imagenet"}},
        "pretrained_path": {**base, "model_kwargs": {"pretrained": "/etc/passwd"}},
        "pretrained_url": {**base, "model_kwargs": {"pretrained": "http://127.0.0.1:9/w.pth"}},
        "pretrained_resnet": {**base, "arch": "fcn8s_resnet18", "model_kwargs": {"pretrained": True}},
        "pretrained_vgg": {**base, "arch": "fcn32s_vgg16", "model_kwargs": {"pretrained": True}},
        "pretrained_googlenet": {**base, "arch": "fcn32s_googlenet", "model_kwargs": {"pretrained": 1}},
        "pretrained_lite_path": {**base, "arch": TINY_ARCH, "model_kwargs": {"pretrained": str(marker)}},
        "keep_fc8": {**base, "model_kwargs": {"keep_fc8": True}},
        "kwarg_weights": {**base, "model_kwargs": {"weights": "IMAGENET1K_V1"}},
        "kwarg_state": {**base, "model_kwargs": {"state": {"x": 1}}},
        "kwargs_list": {**base, "model_kwargs": ["pretrained"]},
        "upsample_evil": {**base, "model_kwargs": {"upsample": "__import__('os')"}},
        "fc_channels_huge": {**base, "model_kwargs": {"fc_channels": 10 ** 9}},
        "fc_kernel_huge": {**base, "model_kwargs": {"fc_kernel": 999}},
        "dropout_text": {**base, "model_kwargs": {"dropout": "0.5"}},
        "learnable_text": {**base, "model_kwargs": {"learnable_upsample": "yes"}},
        "no_arch": {k: v for k, v in base.items() if k != "arch"},
        "arch_unknown": {**base, "arch": "fcn8s_vgg61"},
        "arch_int": {**base, "arch": 7},
        "arch_code": {**base, "arch": "__import__('os').system('touch x')"},
        "arch_dunder": {**base, "arch": "__class__"},
        "classes_eleven": {**base, "num_classes": "eleven"},
        "classes_negative": {**base, "num_classes": -5},
        "classes_huge": {**base, "num_classes": 10 ** 7},
        "classes_zero": {**base, "num_classes": 0},
        "classes_float": {**base, "num_classes": 2.5},
        "classes_bool": {**base, "num_classes": True},
        "classes_missing": {k: v for k, v in base.items() if k != "num_classes"},
        "names_short": {**base, "num_classes": 11, "classes": ["a", "b"]},
        "colors_short": {**base, "num_classes": 11, "colors": [[0, 0, 0]]},
        "colors_range": {**base, "colors": [[0, 0, 300], [0, 0, 0]]},
        "colors_shape": {**base, "colors": [[0, 0], [0, 0, 0]]},
        "names_newline": {**base, "classes": ["a\nb", "c"]},
        "names_not_list": {**base, "classes": "ab"},
        "std_zero": {**base, "normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}},
        "mean_text": {**base, "normalization": {"mean": ["a", 0, 0], "std": [1, 1, 1]}},
        "std_missing": {**base, "normalization": {"mean": [0, 0, 0]}},
        "normalization_list": {**base, "normalization": [0, 1]},
        "format_other": {**base, "format": "other/2"},
        "stored_dtype_pickle": {**base, "stored_dtype": "pickle"},
        "top_stride_negative": {**base, "top_stride": -1},
        "metrics_list": {**base, "metrics": [1, 2]},
        "wrong_classes_for_weights": None,  # filled below: a valid record whose weights do not fit
    }
    out = []
    for name, rec in records.items():
        if rec is not None:
            out.append((name, _meta_file(d / f"{name}.safetensors", json.dumps(rec))))
    raw = {
        "json_broken": "{",
        "json_array": "[]",
        "json_string": '"x"',
        "json_null": "null",
        "json_nan_mean": json.dumps({**base}).replace('"model_kwargs"', '"normalization": {"mean": [NaN, 0, 0], '
                                                                         '"std": [1, 1, 1]}, "model_kwargs"'),
        "json_deep": "[" * 100000 + "]" * 100000,
        "json_huge": json.dumps({**base, "provenance": {"pad": "x" * (17 << 20)}}),
    }
    out += [(name, _meta_file(d / f"{name}.safetensors", text)) for name, text in raw.items()]

    # records that are fine but weights that are not
    state = {k: v.contiguous() for k, v in fcnseg.load_checkpoint(good).state_dict().items()}
    rec = dict(fcnseg.weights.checkpoint.read_record(good))
    out.append(("weights_for_5_classes", _meta_file(d / "w5.safetensors", json.dumps(
        {**rec, "num_classes": 5, "classes": list("abcde"), "colors": [[0, 0, i] for i in range(5)]}), state)))
    out.append(("weights_missing", _meta_file(d / "wm.safetensors", json.dumps(rec),
                                              {k: v for i, (k, v) in enumerate(state.items()) if i % 7})))
    out.append(("weights_extra", _meta_file(d / "we.safetensors", json.dumps(rec),
                                            {**state, "evil.weight": torch.zeros(3)})))
    out.append(("weights_other_arch", _meta_file(d / "wa.safetensors", json.dumps({**rec, "arch": "fcn8s_resnet18"}),
                                                 state)))
    # only a side .json record, and a broken one
    _meta_file(d / "side.safetensors", None)
    (d / "side.json").write_text("{not json")
    out.append(("side_json_broken", d / "side.safetensors"))

    # tampered safetensors headers
    good_bytes = good.read_bytes()
    blobs = {
        "truncated_100": good_bytes[:100],
        "truncated_half": good_bytes[: len(good_bytes) // 2],
        "empty": b"",
        "seven_bytes": b"\x01" * 7,
        "random": np.random.default_rng(0).bytes(4096),
        "header_length_huge": _safetensors_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                                 b"\0" * 4, length=1 << 60),
        "header_length_zero": _safetensors_bytes(b"", length=0),
        "header_not_json": _safetensors_bytes(b"{{{{", b""),
        "offsets_past_end": _safetensors_bytes({"x": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 1 << 22]}},
                                               b"\0" * 16),
        "shape_huge": _safetensors_bytes({"x": {"dtype": "F32", "shape": [1 << 20, 1 << 20, 1 << 20],
                                                "data_offsets": [0, 4]}}, b"\0" * 4),
        "dtype_unknown": _safetensors_bytes({"x": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "metadata_not_strings": _safetensors_bytes({"__metadata__": {"fcnseg": {"arch": 1}},
                                                    "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                                   b"\0" * 4),
    }
    for name, blob in blobs.items():
        path = d / f"{name}.safetensors"
        path.write_bytes(blob)
        out.append((name, path))

    # exported ONNX files whose embedded record is tampered (a one-node graph carries it)
    for name, text in {"onnx_record_broken": "{", "onnx_record_unknown_arch": json.dumps({**base, "arch": "x"}),
                       "onnx_record_kwargs": records["pretrained_true"] and json.dumps(records["pretrained_true"])}.items():
        out.append((name, _onnx_with_record(d / f"{name}.onnx", text)))

    # pickles that run a command, under every extension a user might pass
    payload = pickle.dumps({"state_dict": Payload(marker)})
    for ext in (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl", ".json", ".onnx", ".npy", ".tar", ""):
        path = d / f"pickle{ext or '_noext'}"
        path.write_bytes(payload)
        out.append((f"pickle{ext or '_noext'}", path))
    torch.save({"state_dict": Payload(marker)}, d / "torch_zip.pth")
    out.append(("torch_zip_pickle", d / "torch_zip.pth"))
    run = d / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.safetensors").write_bytes(payload)
    out.append(("run_dir_pickle", d / "run"))
    return out


def _png(path: Path, array: np.ndarray, **kw) -> bytes:
    Image.fromarray(array, **kw).save(path)
    return path.read_bytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _png_chunk(b"IEND", b"")


def damaged_dataset(root: Path) -> list[tuple[str, str, Path]]:
    """A folder dataset with good pairs and damaged files; returns (name, role, file) per damaged file, role
    "image" or "mask" for a file that is bad on its own, "pair" for a mask that does not fit its image or classes."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\nfg\nthing\n")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (20, 24), dtype=np.uint8)
    tmp = root / "tmp.png"
    good_image, good_mask = _png(tmp, image), _png(tmp, mask)
    jpeg = root / "tmp.jpg"
    Image.fromarray(image).save(jpeg)
    good_jpeg = jpeg.read_bytes()
    jpeg.unlink()
    tmp.unlink()

    blobs: dict[str, bytes] = {"empty": b"", "text": b"hello, not an image\n", "html": b"<html><body>x</body></html>",
                               "bomb": png_bomb(60000, 60000), "bomb_wide": png_bomb(1 << 30, 4),
                               "zero_size": png_bomb(0, 0)}
    # cut inside the pixel data (a cut after the last IDAT chunk loses only IEND, and the pixels are whole)
    for i, cut in enumerate((1, 8, 16, 20, 33, 37, 40, 60, 100, 200, 500, len(good_image) // 2)):
        blobs[f"truncated_png_{i}"] = good_image[:cut]
    for i, cut in enumerate((2, 4, 10, 100, 300, len(good_jpeg) // 2, len(good_jpeg) - 2)):
        blobs[f"truncated_jpeg_{i}"] = good_jpeg[:cut]
    for i in range(15):
        blobs[f"random_{i}"] = rng.bytes(int(rng.integers(1, 3000)))
    for i in range(10):  # zeroed bytes inside the compressed data
        bad = bytearray(good_image)
        pos = int(rng.integers(60, len(bad) - 20))
        bad[pos:pos + 8] = bytes(8)
        blobs[f"corrupt_png_{i}"] = bytes(bad)
    blobs["png_signature_only"] = b"\x89PNG\r\n\x1a\n"
    blobs["gzip_bomb_named_png"] = zlib.compress(b"\0" * (1 << 20))

    damaged: list[tuple[str, str, Path]] = []
    n = 0
    for role in ("image", "mask"):
        for name, blob in blobs.items():
            stem = f"{role}_{name}"
            img = root / "images" / f"{stem}.png"
            msk = root / "masks" / f"{stem}.png"
            img.write_bytes(blob if role == "image" else good_image)
            msk.write_bytes(blob if role == "mask" else good_mask)
            damaged.append((stem, role, img if role == "image" else msk))
            n += 1
    # masks that read fine but do not fit
    specials = {
        "mask_wrong_size": _png(root / "masks" / "x.png", np.zeros((7, 9), np.uint8)),
        "mask_values_out_of_range": _png(root / "masks" / "x.png", np.full((20, 24), 7, np.uint8)),
        "mask_16bit": None,
        "mask_float": None,
        "image_16bit_grey": None,
    }
    for stem in specials:
        (root / "images" / f"{stem}.png").write_bytes(good_image)
    for stem, blob in specials.items():
        path = root / "masks" / f"{stem}.png"
        if blob is not None:
            path.write_bytes(blob)
    Image.fromarray(np.full((20, 24), 300, np.uint16)).save(root / "masks" / "mask_16bit.png")
    Image.fromarray(np.full((20, 24), 0.5, np.float32)).save(root / "masks" / "mask_float.tif")
    (root / "masks" / "mask_float.png").write_bytes((root / "masks" / "mask_float.tif").read_bytes())
    (root / "masks" / "mask_float.tif").unlink()
    (root / "masks" / "x.png").unlink()
    Image.fromarray(np.full((20, 24), 40000, np.uint16)).save(root / "images" / "image_16bit_grey.png")
    (root / "masks" / "image_16bit_grey.png").write_bytes(good_mask)
    for stem in specials:  # a reader alone cannot know a mask's expected size or classes: the pair is bad
        role = "image" if stem == "image_16bit_grey" else "pair"
        damaged.append((stem, role, root / ("images" if role == "image" else "masks") / f"{stem}.png"))
    # listing problems: a folder named like an image, a symlink loop, a link to a device, a mask with no image
    (root / "images" / "folder_named_png.png").mkdir()
    (root / "masks" / "folder_named_png.png").write_bytes(good_mask)
    os.symlink("loop_b.png", root / "images" / "loop_a.png")
    os.symlink("loop_a.png", root / "images" / "loop_b.png")
    (root / "masks" / "loop_a.png").write_bytes(good_mask)
    os.symlink("/dev/zero", root / "images" / "dev_zero.png")
    (root / "masks" / "dev_zero.png").write_bytes(good_mask)
    (root / "masks" / "orphan_mask.png").write_bytes(good_mask)
    for stem in ("folder_named_png", "loop_a", "dev_zero"):
        damaged.append((stem, "image", root / "images" / f"{stem}.png"))
    # two good pairs, so the dataset is not empty
    for i in range(2):
        (root / "images" / f"good_{i}.png").write_bytes(good_image)
        (root / "masks" / f"good_{i}.png").write_bytes(good_mask)
    return damaged


# ----------------------------------------------------------------------------------------- the fuzz test

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = fcnseg.build_model(TINY_ARCH, num_classes=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("good") / "good.safetensors", dtype=torch.float16)


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_fuzz_hostile_checkpoints_and_damaged_data(tmp_path, proxy, good_checkpoint):
    marker = tmp_path / "PAYLOAD_RAN"
    torch_home = poisoned_torch_home(tmp_path / "torch_home", marker)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(photo)

    ckpts = hostile_checkpoints(tmp_path / "ckpts", marker, good_checkpoint)
    damaged = damaged_dataset(tmp_path / "data")
    assert len(ckpts) >= 50 and len(damaged) >= 100, (len(ckpts), len(damaged))

    cases = []
    for name, path in ckpts:
        cases.append({"name": f"predict:{name}", "argv": ["predict", str(photo), "--checkpoint", str(path),
                                                          "--out", str(tmp_path / "out" / name)]})
        cases.append({"name": f"load:{name}", "call": "load_checkpoint", "path": str(path)})
    for name, role, path in damaged:
        if role == "pair":
            continue
        cases.append({"name": f"read:{name}", "call": "read_image" if role == "image" else "read_mask",
                      "path": str(path)})
    cases_file, results_file = tmp_path / "cases.json", tmp_path / "results.json"
    cases_file.write_text(json.dumps(cases))
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    env = {**os.environ, "TORCH_HOME": str(torch_home), "HTTP_PROXY": proxy_url, "HTTPS_PROXY": proxy_url,
           "http_proxy": proxy_url, "https_proxy": proxy_url, "ALL_PROXY": proxy_url, "NO_PROXY": "",
           "no_proxy": "", "FUZZ_PROXY_PORT": str(proxy.server_address[1]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_child.py"), str(cases_file), str(results_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(results_file.read_text())

    failures = []
    for r in report["results"]:
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        if r["escaped"] or r["code"] != 1 or len(lines) != 1 or not lines[0].startswith("fcnseg: error: ") \
                or "Traceback" in r["stderr"]:
            failures.append(f"{r['name']}: code {r['code']}, escaped {r['escaped']}, stderr {r['stderr'][-300:]!r}")
    assert not failures, f"{len(failures)} of {len(report['results'])} cases:\n" + "\n".join(failures)
    assert not marker.exists(), "a payload ran"
    assert proxy.requests == [] and report["connections"] == []

    # the same damaged dataset through 'fcnseg data check': one line per damaged file, exit 1, no traceback
    check = subprocess.run([sys.executable, "-m", "fcnseg", "data", "check", "--dataset", "folder", "--root",
                            str(tmp_path / "data"), "--split", "all", "--no-progress", "--no-weights-json"],
                           env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 1 and "Traceback" not in check.stderr, check.stderr[-2000:]
    output = check.stdout + check.stderr
    for name, _, path in damaged:
        assert sum(path.name in line for line in output.splitlines()) >= 1, f"{name} not reported"


def test_the_poisoned_cache_would_run_its_payload(tmp_path):
    """The positive control: what the fuzz test refuses really runs code when unpickled the old way."""
    marker = tmp_path / "RAN"
    home = poisoned_torch_home(tmp_path / "home", marker)
    torch.load(home / "hub" / "checkpoints" / HUB_FILES[0], weights_only=False)
    assert marker.exists()


def test_a_record_asking_for_imagenet_weights_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """Finding 1: the record's kwargs reached the builder, which fetched and unpickled ImageNet weights."""
    path = _meta_file(tmp_path / "evil.safetensors", json.dumps(
        {"arch": "fcn32s_alexnet", "num_classes": 2, "model_kwargs": {"pretrained": True}}))
    called = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: called.append(a))
    with pytest.raises(FcnsegError, match=r"evil.safetensors: record field 'model_kwargs': 'pretrained' is not"):
        fcnseg.load_checkpoint(path)
    assert called == []


def test_no_checkpoint_load_or_plain_build_calls_the_imagenet_loader(monkeypatch):
    """A checkpoint's weights come from its file alone: the builders consult the ImageNet loader only when ImageNet
    weights are asked for, so loading a checkpoint (or building any registered net without them) never runs it."""
    from fcnseg.models import light, paper, resnet

    calls = []
    for module in (light, paper, resnet):
        monkeypatch.setattr(module, "load_imagenet", lambda *args: calls.append(args))
    fcnseg.load_checkpoint("camvid")
    with torch.device("meta"):
        for name in fcnseg.list_models():
            fcnseg.build_model(name, num_classes=2)
    assert calls == []


def test_imagenet_weights_from_the_hub_cache_are_read_without_unpickling(tmp_path, monkeypatch):
    """Where a user asks for ImageNet weights themselves, a poisoned cache is refused, not run."""
    marker = tmp_path / "RAN"
    monkeypatch.setenv("TORCH_HOME", str(poisoned_torch_home(tmp_path / "home", marker)))
    with pytest.raises(FcnsegError, match="refused"):
        fcnseg.build_model("fcn32s_alexnet", num_classes=2, pretrained=True)
    assert not marker.exists()


@pytest.mark.parametrize("field,value,message", [
    ("num_classes", "eleven", "whole number from 1 to 65535"),
    ("num_classes", -5, "whole number"),
    ("num_classes", 10 ** 7, "whole number"),
    ("arch", "nope", "not a registered model"),
    ("model_kwargs", {"upsample": "deconv", "skips": [16]}, "'skips' is not a build argument"),
    ("classes", ["a", "b"], "2 names for 11 classes"),
    ("colors", [[1, 2, 3]], "1 colours for 11 classes"),
    ("precision_gate", "passed", "must be an object, got str"),
])
def test_each_bad_field_is_named_in_one_line(field, value, message):
    record = {"arch": TINY_ARCH, "num_classes": 11, field: value}
    if field == "num_classes":
        record.pop("classes", None)
    with pytest.raises(FcnsegError, match=message) as err:
        CheckpointRecord.parse(record, "f.safetensors")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"f.safetensors: record field '{field}'")


def test_weights_that_do_not_fit_say_which_tensors(tmp_path, good_checkpoint):
    state = {k: v.contiguous() for k, v in fcnseg.load_checkpoint(good_checkpoint).state_dict().items()}
    rec = dict(fcnseg.weights.checkpoint.read_record(good_checkpoint))
    path = _meta_file(tmp_path / "w.safetensors", json.dumps(
        {**rec, "num_classes": 5, "classes": list("abcde"), "colors": [[0, 0, i] for i in range(5)]}), state)
    with pytest.raises(FcnsegError, match=r"score_fr.weight \(3, 1280, 1, 1\) \(expected \(5, 1280, 1, 1\)\)"):
        fcnseg.load_checkpoint(path)


def test_a_record_for_too_many_classes_allocates_nothing(tmp_path):
    """num_classes near the limit on a VGG net would need terabytes for its deconvolutions: the shape check
    runs on the meta device, so the refusal costs nothing."""
    path = _meta_file(tmp_path / "big.safetensors", json.dumps(
        {"arch": "fcn8s_vgg16", "num_classes": 60000, "model_kwargs": {"upsample": "bilinear"}}))
    with pytest.raises(FcnsegError, match="weights do not fit fcn8s_vgg16 with 60000 classes"):
        fcnseg.load_checkpoint(path)


def test_builtin_weights_are_verified_against_their_sha256(tmp_path, monkeypatch):
    import shutil

    from fcnseg.weights import checkpoint

    weights = tmp_path / "weights"
    shutil.copytree(checkpoint.WEIGHTS_DIR, weights)
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", weights)
    assert fcnseg.load_checkpoint("camvid").num_classes == 11
    data = bytearray((weights / "camvid.safetensors").read_bytes())
    data[-100] ^= 0xFF  # one flipped byte deep in the weights
    (weights / "camvid.safetensors").write_bytes(bytes(data))
    with pytest.raises(FcnsegError, match="does not match its sha256"):
        fcnseg.load_checkpoint("camvid")
