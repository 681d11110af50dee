"""fcnseg's fcn8s_vgg16 against the torchfcn port's FCN8s (same weights, same input) and torchvision's
fcn_resnet50 (same input; its weights differ, so only time and memory compare).

Every configuration runs in a fresh process through ``fcnseg.evaluation.benchmark`` (warm-up, timed runs, peak
memory = peak resident memory during inference minus the process's memory after imports). Ratios are
against the port run as its users run it: float32, NCHW, eager.

Weights: fcn8s_vgg16 as ``build_model`` makes it (torchvision's VGG initialisation), with the score
layers given random non-zero weights (the paper's zero init would make every pixel class 0 and the
agreement check meaningless); copied into torchfcn's FCN8s by layer name (``fcnseg.weights.convert``'s map).
Input: a photograph (scikit-image's astronaut) resized to --size, ImageNet-normalised. The int8 rows
quantize the exported ONNX model with ``fcnseg.weights.export.quantize_onnx`` (all convolutions but the
head's, only fc6 and fc7, or those and conv5), calibrated on three other photographs, with 8-bit weights
where the CPU has VNNI and 7-bit ones elsewhere (``quantize_onnx``'s default).

Set-up (benchmark only): pip install --no-deps torchfcn && pip install pytz
torchfcn's package imports ``fcn`` (a chainer-based package) only to download Caffe weights; it is
not needed to build or run FCN8s, so an empty stand-in module is registered under that name when it
is missing. Nothing of torchfcn is copied here.

    OMP_NUM_THREADS=2 python benchmarks/compare_fcn8s.py --size 500 500 --iters 3
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch


def _import_torchfcn():
    try:
        import fcn  # noqa: F401
    except ModuleNotFoundError:
        stub = types.ModuleType("fcn")
        stub.__doc__ = "stand-in: torchfcn uses fcn.data.cached_download only to fetch pretrained Caffe weights"
        sys.modules["fcn"] = stub
    try:
        import torchfcn
    except ModuleNotFoundError as e:
        raise SystemExit(f"compare_fcn8s: {e.name} is missing: pip install --no-deps torchfcn && pip install pytz")
    return torchfcn


def to_torchfcn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fcnseg's FCN-8s state dict under torchfcn's names (conv1_1 ... fc7, score_*, upscore*)."""
    from fcnseg.weights.convert import reference_names

    state = model.state_dict()
    out = {}
    for ref, mine in reference_names(model).items():
        for kind in ("weight", "bias"):
            if f"{mine}.{kind}" in state:
                out[f"{ref}.{kind}"] = state[f"{mine}.{kind}"]
    return out


def build_torchfcn(checkpoint: str) -> torch.nn.Module:
    """torchfcn's FCN8s holding the fcnseg checkpoint's weights (a factory for fcnseg.evaluation.benchmark)."""
    import fcnseg

    torchfcn = _import_torchfcn()
    mine = fcnseg.load_checkpoint(checkpoint)
    port = torchfcn.models.FCN8s(n_class=mine.num_classes)
    port.load_state_dict(to_torchfcn_state(mine), strict=True)
    del mine
    return port.eval()


class _Trunk(torch.nn.Module):
    """The backbone's features as a tuple (what an ONNX graph can return)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor):
        feats = self.backbone(x)
        return tuple(feats[s] for s in sorted(feats))


def export_trunk(checkpoint: str, path: Path) -> Path:
    """The VGG16 trunk (conv1_1 .. pool5, features at strides 8, 16, 32) as ONNX, dynamic height and width."""
    import contextlib
    import io
    import logging
    import warnings

    import fcnseg

    model = fcnseg.load_checkpoint(checkpoint)
    auto = torch.export.Dim.AUTO
    logging.getLogger("torch.fx.experimental.symbolic_shapes").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Trunk(model.backbone), (torch.randn(1, 3, 224, 224),), dynamo=True,
                                    input_names=["image"], dynamic_shapes={"x": {0: auto, 2: auto, 3: auto}},
                                    external_data=False)
    program.save(str(path))
    return path


class OnnxRuntimeTrunk(torch.nn.Module):
    """A backbone run by ONNX Runtime in float32, with the backbone's contract: {stride: features}."""

    def __init__(self, path: str, strides) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # the arena keeps its largest extent: ~150 MB more at 500 x 500
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.strides = tuple(sorted(strides))

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        outs = self.session.run(None, {"image": x.float().contiguous().numpy()})
        return {s: torch.from_numpy(o) for s, o in zip(self.strides, outs)}


def build_hybrid(checkpoint: str, trunk: str) -> torch.nn.Module:
    """fcn8s_vgg16 with its float32 trunk in ONNX Runtime and fc6/fc7 in bfloat16 (fcnseg's optimize),
    scoring and upsampling in float32: the trunk keeps float32 accuracy at ONNX Runtime's speed, and the
    fc layers, 90% of the weights, take half the memory."""
    import fcnseg
    from fcnseg.inference.optimize import CastInputs, optimize

    model = fcnseg.load_checkpoint(checkpoint)
    model.backbone = OnnxRuntimeTrunk(trunk, model.backbone.strides)
    optimize(model.fc, torch.bfloat16, channels_last=True, inplace=True)
    for layer in [model.score_fr, *model.score_skip.values()]:
        layer.register_forward_pre_hook(CastInputs(torch.float32, False))
    return model.eval()


def build_fcn_resnet50(num_classes: int = 21) -> torch.nn.Module:
    from torchvision.models.segmentation import fcn_resnet50

    return fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False).eval()


def make_weights(path: Path, seed: int = 0) -> Path:
    import fcnseg

    torch.manual_seed(seed)
    model = fcnseg.build_model("fcn8s_vgg16", num_classes=21)
    for conv in [model.score_fr, *model.score_skip.values()]:
        torch.nn.init.normal_(conv.weight, std=conv.in_channels ** -0.5)
        torch.nn.init.normal_(conv.bias, std=0.01)
    return fcnseg.save_checkpoint(model, path)


def photo_batch(photo, h: int, w: int) -> np.ndarray:
    """A PIL photo resized to h x w, ImageNet-normalised, as a (1, 3, h, w) float32 array."""
    from fcnseg.record import IMAGENET_MEAN, IMAGENET_STD
    from fcnseg.weights.export import calibration_batch

    return calibration_batch(photo, (h, w), IMAGENET_MEAN, IMAGENET_STD)


def make_input(path: Path, h: int, w: int) -> Path:
    from PIL import Image

    try:
        from skimage import data

        photo = Image.fromarray(data.astronaut())
    except ImportError:  # smooth colour blobs instead of a photograph
        rng = np.random.default_rng(0)
        photo = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8))
    np.save(path, photo_batch(photo, h, w))
    return path


# fc6, fc7 and VGG's last block (conv5_1..5_3): the layers that int8 changed least on the other photographs
CONV5_AND_FC = ("fc.", "backbone.features.24.", "backbone.features.26.", "backbone.features.28.")


def quantize(fp32_onnx: str, path: Path, h: int, w: int, only: tuple[str, ...] = ()) -> str:
    """Static int8 model (``fcnseg.weights.export.quantize_onnx``; ``only``: just those layers) calibrated on
    three other photographs than the benchmark's input (``other_photos``)."""
    from fcnseg.weights.export import quantize_onnx

    return str(quantize_onnx(fp32_onnx, path, other_photos(h, w), only=only))


def other_photos(h: int, w: int) -> list[np.ndarray]:
    """Three photographs other than the benchmark's input (scikit-image's cat, coffee and rocket), as batches."""
    from PIL import Image
    from skimage import data

    return [photo_batch(Image.fromarray(f()), h, w) for f in (data.chelsea, data.coffee, data.rocket)]


def fragile_layers(checkpoint: str, h: int, w: int, target: float = 0.995, most: int = 4) -> list[str]:
    """The layers to keep float32 in the bfloat16 model, chosen by agreement on the other photographs (never the
    timed input): each layer is tried alone in float32 (the rest bfloat16, score and upsampling float32 as
    always); the ones whose float32 copy raises the pixel agreement with the float32 model most are kept, one
    at a time, until the agreement reaches ``target`` or ``most`` layers are kept. Random weights leave no
    labels to score, so agreement is the measure here; on a trained net ``fcnseg.evaluation.precision.layer_sensitivity``
    ranks layers by mean IU."""
    import fcnseg
    from fcnseg.inference.optimize import optimize
    from fcnseg.evaluation.precision import sensitivity_units

    model = fcnseg.load_checkpoint(checkpoint)
    photos = [torch.from_numpy(p) for p in other_photos(h, w)]
    with torch.inference_mode():
        base = optimize(model, None)
        want = [base(x).argmax(1) for x in photos]
        del base

        def agreement(keep: list[str]) -> float:
            net = optimize(model, torch.bfloat16, keep_float32=keep)
            return float(np.mean([(net(x).argmax(1) == y).float().mean().item() for x, y in zip(photos, want)]))

        kept, now = [], agreement([])
        print(f"  bf16, head float32 only: {100 * now:.2f}% of the other photographs' pixels agree", file=sys.stderr)
        alone = {u: agreement([u]) for u in sensitivity_units(model, "bfloat16")}
        for unit in sorted(alone, key=alone.get, reverse=True):
            if now >= target or len(kept) >= most:
                break
            kept.append(unit)
            now = agreement(kept)
            print(f"  + {unit} float32: {100 * now:.2f}%", file=sys.stderr)
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], help="labels of configurations to leave out")
    args = parser.parse_args()

    from fcnseg.evaluation.benchmark import benchmark, export_for_onnxruntime

    _import_torchfcn()  # fail early, before the long runs
    here = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    h, w = args.size
    with tempfile.TemporaryDirectory(prefix="fcnseg-compare-") as tmp:
        tmp = Path(tmp)
        ckpt = str(make_weights(tmp / "fcn8s.safetensors"))
        x = str(make_input(tmp / "x.npy", h, w))
        common = {"size": [h, w], "iters": args.iters, "warmup": args.warmup, "input": x}
        configs = [
            ("torchfcn FCN8s fp32 (port)", {"model": "compare_fcn8s:build_torchfcn",
                                            "factory_kwargs": {"checkpoint": ckpt}, "optimize": False}),
            ("fcnseg fp32 NCHW (as built)", {"model": ckpt, "optimize": False}),
            ("fcnseg fp32 channels-last", {"model": ckpt, "channels_last": True}),
            ("fcnseg bf16 channels-last", {"model": ckpt, "dtype": "bfloat16", "channels_last": True}),
            ("fcnseg bf16, fragile layers fp32", {"model": ckpt, "dtype": "bfloat16", "keep_float32": "FRAGILE"}),
            ("fcnseg ONNX Runtime fp32", {"model": ckpt, "backend": "onnxruntime"}),
            ("fcnseg ORT fp32, int8 fc6/fc7", {"model": ckpt, "backend": "onnxruntime", "int8": ("fc.",)}),
            ("fcnseg ONNX Runtime int8", {"model": ckpt, "backend": "onnxruntime", "int8": ()}),
            ("fcnseg OpenVINO fp32", {"model": ckpt, "backend": "openvino"}),
            ("fcnseg OpenVINO, int8 fc6/fc7", {"model": ckpt, "backend": "openvino", "int8": ("fc.",)}),
            ("fcnseg OpenVINO, int8 fc6/fc7+conv5", {"model": ckpt, "backend": "openvino", "int8": CONV5_AND_FC}),
            ("fcnseg OpenVINO int8", {"model": ckpt, "backend": "openvino", "int8": ()}),
            ("ORT fp32 trunk + torch bf16 fc6/fc7", {"model": "compare_fcn8s:build_hybrid", "optimize": False,
                                                     "factory_kwargs": {"checkpoint": ckpt, "trunk": "TRUNK"}}),
            ("torchvision fcn_resnet50 fp32", {"model": "compare_fcn8s:build_fcn_resnet50", "optimize": False}),
            ("torchvision fcn_resnet50 bf16 cl", {"model": "compare_fcn8s:build_fcn_resnet50", "dtype": "bfloat16"}),
        ]
        rows = []
        for label, spec in configs:
            if label in args.skip:
                continue
            spec = {**common, **spec, "save_argmax": str(tmp / f"argmax{len(rows)}.npy")}
            if spec.get("backend") in ("onnxruntime", "openvino"):
                int8 = spec.pop("int8", None)
                spec.update(export_for_onnxruntime(spec, tmp / "fcn8s.onnx"))
                if int8 is not None:
                    spec["model"] = quantize(spec["model"], tmp / "fcn8s-int8.onnx", h, w, only=int8)
            if spec.get("keep_float32") == "FRAGILE":
                print("choosing the layers to keep float32 ...", file=sys.stderr, flush=True)
                spec["keep_float32"] = fragile_layers(ckpt, h, w)
                label = f"fcnseg bf16, {', '.join(spec['keep_float32']) or 'no layer'} fp32"
            if spec.get("factory_kwargs", {}).get("trunk") == "TRUNK":
                spec["factory_kwargs"]["trunk"] = str(export_trunk(ckpt, tmp / "trunk.onnx"))
                spec["flops"] = rows[0][1]["gflops_per_batch"] * 1e9  # ONNX Runtime's share cannot be counted
            print(f"running {label} ...", file=sys.stderr, flush=True)
            result = benchmark(spec, env=env)
            rows.append((label, result, np.load(spec["save_argmax"])))

    port_label, port, port_argmax = rows[0]
    print(f"\nFCN-8s at {h}x{w}, batch 1, {port['threads']} threads, torch {port['torch']}; "
          f"{port['gflops_per_batch']:.0f} GFLOPs per image (FlopCounterMode)")
    head = (f"{'configuration':<34} {'median s':>9} {'p95 s':>7} {'GFLOP/s':>8} {'peak MB':>8} "
            f"{'speed-up':>9} {'memory':>7} {'agree %':>8}")
    print(head)
    print("-" * len(head))
    for label, r, argmax in rows:
        same_weights = "resnet50" not in label
        agree = f"{100 * (argmax == port_argmax).mean():.2f}" if same_weights else "-"
        gf = f"{r['gflops_per_second']:.0f}" if r.get("gflops_per_second") else "-"
        print(f"{label:<34} {r['latency_ms_median'] / 1000:>9.2f} {r['latency_ms_p95'] / 1000:>7.2f} {gf:>8} "
              f"{r['peak_memory_mb']:>8.0f} {port['latency_ms_median'] / r['latency_ms_median']:>8.2f}x "
              f"{r['peak_memory_mb'] / port['peak_memory_mb']:>6.2f}x {agree:>8}")
    print("speed-up = port time / time; memory = peak memory / port's; agree = pixels whose class equals the port's")
    print(f"peak memory: {port['peak_memory_method']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
