"""Mixed precision for training: what ``amp`` asks for, and ``amp: auto``'s decision by measurement.

``choose_amp`` picks bf16 autocast only where the device runs bf16 natively and a timed forward and backward
pass on a batch of the run's training shape finds it clearly faster than float32. The passes are timed in
fresh processes (``probe_train_step``), ``AMP_PROBE_ROUNDS`` per precision in alternating order, each
precision's best counting: timing them in the training process left it about 20% slower for the rest of the
run on a 2-core Xeon (channels-last float32 after a bf16 and a float32 probe: 4.0 against 5.2 images/s,
``benchmarks/train_speed.py``), and a fresh process per probe also makes the timings start alike.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..config import TrainConfig
from ..modes import train_mode
from ..hardware import reuse_freed_memory, reusing_freed_memory
from ..evaluation.loop import autocast
from . import engine

logger = logging.getLogger(__name__)

def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that ``amp`` true asks for on ``device``; None for false (``auto`` is decided by
    ``choose_amp``, and means this dtype where that finds it worth it)."""
    if cfg.amp is False:
        return None
    if cfg.amp_dtype == "fp16":
        return torch.float16
    if cfg.amp_dtype == "bf16" or device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---- amp: auto -------------------------------------------------------------------------------------------------
AMP_PROBE_STEPS = 3  # timed forward/backward passes per probe, after one untimed warm-up each
# probes per precision, alternating float32, bf16, bf16, float32, ...; one each was noisy near the threshold on a
# 2-core EPYC (2.14 against 1.87 s in one run, 1.86 against 2.02 s in the next: the choice flipped)
AMP_PROBE_ROUNDS = 2
# below this many seconds per float32 step the run is overhead-bound: bf16 has too little to win to be worth a
# change of numerics, and a timing that close to the noise would make runs of one config differ by chance
AMP_MIN_STEP_S = 0.1
# bf16 must be at least 25% faster. It changes the run's numerics, so it has to pay for that clearly: on the three
# 2-core CPUs measured (docs/results.md) bf16 autocast trained the CamVid recipe at 0.7x to 1.15x the speed of
# float32 channels-last, the probes of one machine spread by up to 15% between processes, and at a 10% margin the
# choice flipped between runs of one command; where bf16 units really pay (GPUs), the gain is well past 25%
AMP_MIN_GAIN = 1.25


def time_train_step(model: nn.Module, loss_fn: engine.SegmentationLoss, images: torch.Tensor, masks: torch.Tensor,
                    dtype: torch.dtype | None, steps: int = AMP_PROBE_STEPS, exact_batch_norm: bool = False) -> float:
    """Median seconds of a forward and backward pass on ``images`` with autocast ``dtype`` (None: full
    precision; ``exact_batch_norm`` as the training step takes it), in this process, leaving no trace on the
    model: gradients, batch-norm statistics and random streams are as they were. (The process itself keeps what
    the passes did to its allocator and oneDNN's caches; ``probe_train_step`` runs this in a fresh process so that
    the run does not.)"""
    device = images.device
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    times = []
    try:
        with train_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i in range(steps + 1):
                for p in model.parameters():
                    p.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with autocast(device, dtype), engine.exact_batch_norm(exact_batch_norm):
                    logits = model(images)
                loss_sum, norm = loss_fn(logits, masks)
                (loss_sum / norm.clamp_min(1)).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:  # the first pass pays for oneDNN's kernel choices and allocations
                    times.append(time.perf_counter() - t0)
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        for n, p in model.named_parameters():
            p.grad = grads[n]
    return float(np.median(times))


PROBE_TIMEOUT_S = 600  # a probe process that takes longer than this is given up (and timed here instead)


def probe_train_step(arch: str, model_kwargs: dict, loss_fn: engine.SegmentationLoss, images: torch.Tensor,
                     num_classes: int, dtype: torch.dtype | None, steps: int = AMP_PROBE_STEPS,
                     exact_batch_norm: bool = False) -> float:
    """``time_train_step`` in a fresh Python process, with this process's torch thread count: the process builds
    the registered architecture ``arch`` (random weights; the time does not depend on them) and times it on random
    data of ``images``' shape and memory format, so nothing the timed passes do (allocations, oneDNN's kernel
    caches) stays in the training process. The job travels as JSON: nothing is pickled. Raises ``RuntimeError``
    when the probe process fails (e.g. an architecture registered only in this process)."""
    weight = getattr(loss_fn, "weight", None)
    job = {"arch": arch, "model_kwargs": dict(model_kwargs), "num_classes": int(num_classes),
           "shape": list(images.shape), "device": str(images.device),
           "channels_last": images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
           and not images.is_contiguous(),
           "loss": {"weight": None if weight is None else weight.tolist(), "reduction": loss_fn.reduction,
                    "sample": loss_fn.sample, "ignore_index": loss_fn.ignore_index},
           "dtype": _dtype_name(dtype), "steps": int(steps), "threads": torch.get_num_threads(),
           "exact_batch_norm": bool(exact_batch_norm), "reuse_freed_memory": reusing_freed_memory()}
    bootstrap = ("import sys; sys.path[:0] = sys.argv[1:]; from fcnseg.train.amp import _probe_child; "
                 "_probe_child()")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", bootstrap, *[p for p in sys.path if p]], input=json.dumps(job),
                          capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the timing process failed: {tail}")
    return float(lines[-1])


def _probe_child() -> None:
    """The probe process: read the JSON job from stdin (written by ``probe_train_step``), print the median
    seconds."""
    from ..registry import build_model

    job = json.loads(sys.stdin.read())
    if job.get("reuse_freed_memory"):  # allocate as the training process does
        reuse_freed_memory()
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    model = build_model(job["arch"], num_classes=job["num_classes"], **{**job["model_kwargs"], "pretrained": False})
    model.to(device)
    g = torch.Generator().manual_seed(0)
    b, _, h, w = job["shape"]
    images = torch.randn(*job["shape"], generator=g).to(device)
    masks = torch.randint(0, job["num_classes"], (b, h, w), generator=g).to(device)
    if job["channels_last"]:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    loss = job["loss"]
    loss_fn = engine.SegmentationLoss(loss["weight"], loss["reduction"], loss["sample"], loss["ignore_index"])
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[job["dtype"]]
    print(time_train_step(model, loss_fn.to(device), images, masks, dtype, steps=job["steps"],
                          exact_batch_norm=job.get("exact_batch_norm", False)), flush=True)


def probe_or_time_here(model: nn.Module, loss_fn: engine.SegmentationLoss, images: torch.Tensor,
                       masks: torch.Tensor, dtype: torch.dtype | None, *, arch: str, model_kwargs: dict,
                       exact_batch_norm: bool = False) -> float:
    """``probe_train_step`` for ``model``, built in the probe process as the registered ``arch`` with
    ``model_kwargs``; where that process fails (an architecture registered only in this process), ``time_train_step``
    here, and the log says so."""
    try:
        classes = getattr(model, "num_classes", None) or int(masks.max()) + 1
        return probe_train_step(arch, model_kwargs, loss_fn, images, int(classes), dtype,
                                exact_batch_norm=exact_batch_norm)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        # expected for an architecture registered in this process only: said, not warned
        logger.info("amp auto: could not time %s in a fresh process (%s); timing it in this one",
                    _dtype_name(dtype), (str(e).splitlines()[0] if str(e) else type(e).__name__)[:200])
        return time_train_step(model, loss_fn, images, masks, dtype, exact_batch_norm=exact_batch_norm)


def native_autocast(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and if not, why (for the log)."""
    from ..hardware import native_bf16_cpu

    if device.type == "cuda":
        return (True, "") if torch.cuda.is_bf16_supported() else (False, "this GPU has no bf16 support")
    if device.type == "cpu":
        if native_bf16_cpu():
            return True, ""
        return False, f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16"
    return False, f"no bf16 probe for {device.type}"


def choose_amp(cfg: TrainConfig, model: nn.Module, loss_fn: engine.SegmentationLoss, batch, device: torch.device,
               timer: Callable | None = None) -> tuple[torch.dtype | None, dict[str, Any]]:
    """The autocast dtype for the run, and the decision as a record ``{"amp", "dtype", "reason", ...}``.

    ``amp`` true or false is taken as set. ``auto``: bf16 autocast only where the device runs bf16
    natively and ``timer`` (a forward and backward pass on ``batch``, ``(images, masks)`` of the run's
    training shape) finds it at least ``AMP_MIN_GAIN`` times faster than full precision, on steps long enough
    (``AMP_MIN_STEP_S``) for that to be measured and to matter; otherwise float32. A decision by measurement,
    not by flag: bf16 autocast was slower than float32 channels-last on a CPU with native bf16 units.
    """
    if cfg.amp != "auto":
        dtype = amp_dtype(cfg, device)
        return dtype, {"amp": cfg.amp, "dtype": _dtype_name(dtype), "reason": "set by amp"}
    native, why = native_autocast(device)
    if not native:
        return None, {"amp": "auto", "dtype": "float32", "reason": why}
    if batch is None:
        return None, {"amp": "auto", "dtype": "float32",
                      "reason": "no training-shaped batch to time (no fixed crop_size, or several heads)"}
    # looked up now, so that tests can stand in for the clock
    timer = timer or functools.partial(probe_or_time_here, arch=cfg.model, model_kwargs=cfg.model_kwargs,
                                       exact_batch_norm=cfg.exact_batch_norm)
    images, masks = batch
    images, masks = images.to(device), masks.to(device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    first = timer(model, loss_fn, images, masks, None)
    if first < AMP_MIN_STEP_S:
        return None, _too_short(first)
    # float32, bf16, bf16, float32: a machine that speeds up or slows down while it is timed favours neither,
    # and each precision's best time stands for it (noise on a shared machine only ever adds time)
    timed = {None: [first], torch.bfloat16: []}
    order = [d for r in range(AMP_PROBE_ROUNDS) for d in ((None, torch.bfloat16), (torch.bfloat16, None))[r % 2]]
    for dtype in order[1:]:  # the first float32 probe is the one above
        timed[dtype].append(timer(model, loss_fn, images, masks, dtype))
    full, half = min(timed[None]), min(timed[torch.bfloat16])
    timings = {_dtype_name(k): [round(t, 4) for t in v] for k, v in timed.items()}
    if full < AMP_MIN_STEP_S:  # the first pass was slow (a cold start, a busy machine); the best one is not
        return None, {**_too_short(full), "timings_s": timings}
    dtype = torch.bfloat16 if half * AMP_MIN_GAIN <= full else None
    return dtype, {"amp": "auto", "dtype": _dtype_name(dtype), "reason": "timed on a training-shaped batch",
                   "float32_step_s": round(full, 4), "bfloat16_step_s": round(half, 4),
                   "timings_s": timings}


def _too_short(step_s: float) -> dict[str, Any]:
    """amp auto's float32 decision for a step of ``step_s`` seconds, under ``AMP_MIN_STEP_S``."""
    return {"amp": "auto", "dtype": "float32", "float32_step_s": round(step_s, 4),
            "reason": f"a float32 step takes {step_s:.3f} s, under {AMP_MIN_STEP_S} s: too short for bf16 to pay"}


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else str(dtype).replace("torch.", "")
