"""Speed measurement: latency median and 95th percentile, images per second, achieved GFLOP/s, and
peak memory, each configuration in a fresh Python process.

Peak memory (CPU): the child process records its resident set size (RSS) after its imports, builds
and prepares the model, returns freed heap pages to the OS (``malloc_trim``), then resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) so
that the transients of building the model in float32 before converting it do not count, and finally
reads ``VmHWM`` after the timed runs. ``peak_memory_mb`` = VmHWM - RSS after imports: the weights,
activations, workspaces and allocator caches that inference holds at its worst moment. Where
clear_refs is unavailable it falls back to ``ru_maxrss`` (which then includes building the model) and
says so in ``peak_memory_method``. On CUDA it is ``torch.cuda.max_memory_allocated``.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` during the first warm-up run
(a multiply-add counts as two).
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

RESULT_KEYS = ("latency_ms_median", "latency_ms_p95", "images_per_second", "peak_memory_mb", "gflops_per_second")

DEFAULT_SPEC: dict[str, Any] = {
    "model": "fcn8s_vgg16",  # registered name (random weights), checkpoint, .onnx file, or "module:factory"
    "factory_kwargs": {},  # keyword arguments for a "module:factory" model
    "num_classes": 21,  # for a registered name
    "backend": "torch",  # or "onnxruntime" / "openvino" (model must then be an .onnx file)
    "dtype": "float32",
    "channels_last": True,
    "keep_float32": None,  # layer names that stay float32 in a bfloat16 model (optimize's keep_float32)
    "optimize": True,  # False: run the model exactly as built (for a foreign model as its users run it)
    "device": "cpu",
    "size": [500, 500],
    "batch": 1,
    "warmup": 2,
    "iters": 10,
    "threads": None,
    "input": None,  # .npy of a normalised (B, 3, H, W) float32 batch; random if None
    "save_argmax": None,  # .npy to write the argmax of the last output to (for agreement checks)
    "flops": None,  # FLOPs per batch when known (an ONNX model cannot be counted here)
    "mode": "model",  # "model": model(x); "segmenter": Segmenter.predict on raw uint8 images (tiling)
    "tile": 1024,
    "overlap": 256,
    "seed": 0,
}


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_torch(spec: dict[str, Any]):
    import torch

    from ..weights.checkpoint import load_checkpoint
    from ..registry import build_model, list_models

    name = spec["model"]
    torch.manual_seed(spec["seed"])
    if name in list_models():
        return build_model(name, num_classes=spec["num_classes"]).eval()
    if ":" in name and not Path(name).exists():
        module, func = name.split(":", 1)
        return getattr(importlib.import_module(module), func)(**spec["factory_kwargs"]).eval()
    return load_checkpoint(name)


def count_flops(model, x) -> int:
    """FLOPs of one forward pass on ``x`` (a multiply-add counts as two)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def export_for_onnxruntime(spec: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Export the spec's torch model to ONNX at ``path``; the spec changes that benchmark it there
    (ONNX Runtime cannot count FLOPs, so they are counted here on the torch model)."""
    import torch

    from ..weights.export import export_onnx

    spec = {**DEFAULT_SPEC, **spec}
    model = _build_torch(spec)
    export_onnx(model, path, example_size=tuple(spec["size"]))
    flops = count_flops(model, torch.zeros(spec["batch"], 3, *spec["size"]))
    return {"model": str(path), "backend": spec["backend"] if spec["backend"] != "torch" else "onnxruntime",
            "flops": flops}


def _model_for(spec: dict[str, Any], device):
    """What ``spec`` times: an exported .onnx file in its runtime (ONNX Runtime in float32; OpenVINO in its own
    float32 or, for bfloat16, bf16 inference precision), or the torch model, converted by ``optimize`` unless
    the spec says otherwise."""
    from ..inference.optimize import optimize

    if spec["backend"] in ("onnxruntime", "openvino"):
        from ..weights.checkpoint import open_model

        return open_model(spec["model"], backend=spec["backend"], threads=spec["threads"], dtype=spec["dtype"])
    if spec["backend"] != "torch":
        raise ValueError(f"unknown backend {spec['backend']!r}")
    model = _build_torch(spec).to(device)
    if spec["optimize"] and spec["mode"] == "model":
        model = optimize(model, spec["dtype"], spec["channels_last"], inplace=True,  # the model is ours
                         keep_float32=spec["keep_float32"])
    return model


def run_benchmark(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process (``benchmark`` runs it in a fresh one)."""
    import torch

    from ..hardware import return_freed_memory

    spec = {**DEFAULT_SPEC, **spec}
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    # code that any model may import counts as the baseline, not as the model's memory
    import torchvision.models  # noqa: F401
    if ":" in spec["model"] and not Path(spec["model"]).exists():
        importlib.import_module(spec["model"].split(":", 1)[0])
    baseline_mb = _rss_mb()
    h, w = spec["size"]
    step, b = _step_for(spec, _model_for(spec, device), device)

    method = "VmHWM after reset (clear_refs) - RSS after imports"
    return_freed_memory()  # what building and loading freed is not the model's (glibc keeps it otherwise)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated"
    elif not _reset_peak() or _status_kb("VmHWM") is None:
        method = "ru_maxrss - RSS after imports (includes building the model)"

    out, times, flops = _timed(step, spec, cuda)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    elif method.startswith("VmHWM"):
        peak_mb = _status_kb("VmHWM") / 1024 - baseline_mb
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mb
    if spec["save_argmax"]:
        arg = out if out.dim() == 3 else out.argmax(1)
        np.save(spec["save_argmax"], arg.to(torch.int16).cpu().numpy())

    lat = np.array(times) * 1000
    median = float(np.median(lat))
    return {
        "latency_ms_median": median,
        "latency_ms_p95": float(np.percentile(lat, 95)),
        "latency_ms_min": float(lat.min()),  # on a shared machine, the run least disturbed by others
        "images_per_second": b / (median / 1000),
        "peak_memory_mb": float(peak_mb),
        "gflops_per_second": (flops / 1e9) / (median / 1000) if flops else None,
        "gflops_per_batch": flops / 1e9 if flops else None,
        "peak_memory_method": method,
        "model": spec["model"], "backend": spec["backend"], "dtype": spec["dtype"],
        "channels_last": spec["channels_last"], "optimize": spec["optimize"], "mode": spec["mode"],
        "size": [h, w], "batch": b, "iters": len(times), "threads": torch.get_num_threads(),
        "device": str(device), "torch": torch.__version__,
    }


def _step_for(spec: dict[str, Any], model, device) -> tuple[Callable[[], Any], int]:
    """The timed step for ``spec["mode"]`` and the images it handles: the whole ``Segmenter.predict`` on
    random uint8 photos ("segmenter"), or the model alone on a random (or ``spec["input"]``) batch."""
    import torch

    from ..inference.segmenter import Segmenter

    h, w = spec["size"]
    b = int(spec["batch"])
    gen = torch.Generator().manual_seed(spec["seed"])
    if spec["mode"] == "segmenter":
        seg = Segmenter(model, device=device, dtype=spec["dtype"] if spec["backend"] == "torch" else None,
                        channels_last=spec["channels_last"], tile=spec["tile"], overlap=spec["overlap"],
                        batch_size=b, inplace=True)
        images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for _ in range(b)]
        return (lambda: seg.predict(images)[0].mask[None]), b
    if spec["input"]:
        x = torch.from_numpy(np.load(spec["input"])).to(device)
    else:
        x = torch.randn(b, 3, h, w, generator=gen).to(device)

    def step():
        with torch.inference_mode():
            out = model(x)
        return out["out"] if isinstance(out, dict) else out  # torchvision's segmentation models

    return step, x.shape[0]


def _timed(step: Callable[[], Any], spec: dict[str, Any], cuda: bool) -> tuple[Any, list[float], float | None]:
    """Run ``step`` ``spec["warmup"]`` times untimed (the first under a FLOP counter for a PyTorch model, unless
    ``spec["flops"]`` gives them), then ``spec["iters"]`` times timed: the last output, the seconds of each timed
    run, and the FLOPs of one step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    flops = spec["flops"]
    out = None
    for i in range(max(1, int(spec["warmup"]))):
        if i == 0 and flops is None and spec["backend"] == "torch":
            with FlopCounterMode(display=False) as counter:
                out = step()
            flops = counter.get_total_flops()
        else:
            out = step()
    times = []
    for _ in range(max(1, int(spec["iters"]))):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, times, flops


def benchmark(spec: dict[str, Any], env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run one configuration (keys as in ``DEFAULT_SPEC``) in a fresh Python process; its results."""
    from ..errors import FcnsegError

    spec = {**DEFAULT_SPEC, **spec}
    proc = subprocess.run([sys.executable, "-m", "fcnseg.evaluation.benchmark", json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FcnsegError(f"benchmark of {spec['model']} failed: {tail[:300]}")
    return json.loads(lines[-1])


def format_results(rows: list[dict[str, Any]], labels: list[str] | None = None) -> str:
    """A plain-text table of benchmark results."""
    labels = labels or [f"{r['model']} {r['backend']} {r['dtype']}" for r in rows]
    width = max(12, *(len(s) for s in labels))
    head = f"{'configuration':<{width}} {'median ms':>10} {'p95 ms':>9} {'img/s':>7} {'peak MB':>8} {'GFLOP/s':>8}"
    out = [head, "-" * len(head)]
    for label, r in zip(labels, rows):
        gf = f"{r['gflops_per_second']:.0f}" if r.get("gflops_per_second") else "-"
        out.append(f"{label:<{width}} {r['latency_ms_median']:>10.1f} {r['latency_ms_p95']:>9.1f} "
                   f"{r['images_per_second']:>7.2f} {r['peak_memory_mb']:>8.0f} {gf:>8}")
    return "\n".join(out)


def _worker(argv: list[str]) -> int:
    from ..hardware import flush_denormal

    # this worker is a program: it opts in to flushing subnormals, before the first parallel operation
    # (OpenMP's threads inherit the setting only when created after it); random weights drive
    # activations into subnormal floats, which take x86's slow path
    with flush_denormal():
        from .. import models  # noqa: F401  (fills the registry before the baseline is taken)

        spec = json.loads(argv[0])
        if spec.get("backend") == "onnxruntime":
            import onnxruntime  # noqa: F401  (its import belongs to the baseline, like torch's)
        elif spec.get("backend") == "openvino":
            import openvino  # noqa: F401
        result = run_benchmark(spec)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
