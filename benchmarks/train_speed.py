"""Training throughput of the CamVid recipe, side by side in one run: "before" (NCHW float32 activations, no
autocast, the optimiser's plain per-tensor loop, glibc malloc's defaults: the recipe as it ran before issue 16)
and "now" (what ``fcnseg train`` does by default: channels-last, ``amp: auto`` decided by its timed probe, the
fused optimiser step, freed memory reused: ``fcnseg.hardware.reuse_freed_memory``). Optional extra
configurations: "system_malloc" ("now" with glibc's defaults, ``--malloc system``), "channels_last" (fp32,
plain optimiser), "exact_bn" ("now" with ``exact_batch_norm: true``: channels-last batch norm as exact as
NCHW's, and what that costs), "flush_denormal" ("now" with subnormal floats flushed to zero), "bf16" (autocast
forced on) and "compile" ("now" under ``torch.compile``, to see whether it wins on this CPU). The table also
shows each process's peak resident memory.

Each configuration runs in a fresh Python process (imports, oneDNN's kernel cache and the allocator start
cold alike) and builds the run as ``fcnseg train`` does (``fcnseg.train.setup.setup_run``: same seed, same
model, data, loss and optimiser), then times ``--steps`` optimiser steps after ``--warmup`` untimed ones,
loading batches with the recipe's loader. Images per second = images trained / seconds of the timed steps.
The backbone starts from random weights (no download; the speed does not depend on their values).

    OMP_NUM_THREADS=2 python benchmarks/train_speed.py --root /work/shared/datasets/camvid --steps 20
    python benchmarks/train_speed.py --synthetic --steps 2 --warmup 1 --size 64 96 --batch-size 2  # a quick check
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "camvid_fcn8s_efficientnet_lite0_cpu.yaml"

# the speed settings of each configuration; the rest of the recipe is the same for all
CONFIGS = {
    "before": {"channels_last": False, "amp": False, "optimizer_step": "plain", "malloc": "system"},
    "now": {},  # fcnseg train's defaults
    "system_malloc": {"malloc": "system"},  # "now" with glibc malloc's defaults (fcnseg train --malloc system)
    "flush_denormal": {"flush_denormal": True},  # "now" with subnormal floats flushed to zero (as inference does)
    "channels_last": {"channels_last": True, "amp": False, "optimizer_step": "plain"},
    "exact_bn": {"exact_batch_norm": True},  # "now" with the exact channels-last batch norm (train/batchnorm.py)
    "bf16": {"channels_last": True, "amp": True, "optimizer_step": "default"},
    "compile": {"compile": True},  # "now" with the model under torch.compile (inductor; needs a C++ compiler)
}


def synthetic_folder(root: Path, n: int, size: tuple[int, int], num_classes: int = 11) -> Path:
    """A ``folder`` dataset of ``n`` random images with random blocky masks at ``size`` (H, W)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"class{i}\n" for i in range(num_classes)))
    h, w = size
    names = []
    for i in range(n):
        name = f"s{i:03d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        blocks = rng.integers(0, num_classes, (h // 16 + 1, w // 16 + 1), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((16, 16), np.uint8))[:h, :w]).save(root / "masks" / f"{name}.png")
        names.append(name)
    (root / "splits" / "train.txt").write_text("\n".join(names) + "\n")
    return root


def _plain_step(optimizer):
    """The same optimiser with torch's per-tensor loop (neither fused nor foreach): the step before issue 16."""
    import inspect

    accepted = inspect.signature(type(optimizer)).parameters  # defaults may hold internal keys
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in ("fused", "foreach")}
    return type(optimizer)(optimizer.param_groups, **defaults, foreach=False, fused=False)


def worker(spec: dict) -> dict:
    """One configuration in this process: build the run as ``fcnseg train`` does, time the steps."""
    import torch

    import fcnseg  # noqa: F401  (fills the registry)
    from fcnseg.config import load_config
    from fcnseg.hardware import flush_denormal, reuse_freed_memory, reusing_freed_memory
    from fcnseg.train import distributed as dst
    from fcnseg.train import engine
    from fcnseg.data.loader import Seeded, make_loader
    from fcnseg.train.setup import setup_run

    settings = dict(spec["settings"])
    if settings.pop("malloc", "reuse") == "reuse":  # as the fcnseg train command does, first thing
        reuse_freed_memory()
    flushing = settings.pop("flush_denormal", False)
    flush = flush_denormal() if flushing else contextlib.nullcontext()  # fcnseg train does not flush
    with flush, tempfile.TemporaryDirectory(prefix="fcnseg-train-speed-") as tmp:
        cfg = load_config(spec["config"])
        cfg.root, cfg.out = spec["root"], str(Path(tmp) / "run")
        cfg.pretrained, cfg.progress, cfg.plots, cfg.val_split = False, False, False, None
        cfg.batch_size, cfg.workers = spec["batch_size"], spec["workers"]
        cfg.crop_size = list(spec["size"])
        if spec["synthetic"]:
            cfg.dataset = "folder"
        if spec["threads"]:
            cfg.threads = spec["threads"]
        step = settings.pop("optimizer_step", "default")
        compiled = settings.pop("compile", False)
        if "amp" not in settings:
            cfg.amp = type(cfg).amp  # the recipe says amp: false (written before auto existed); "now" is the default
        if "channels_last" not in settings:
            cfg.channels_last = type(cfg).channels_last
        for key, value in settings.items():
            setattr(cfg, key, value)
        cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = setup_run(cfg, dst.setup("cpu"), command=None)
        optimizer = _plain_step(run.optimizer) if step == "plain" else run.optimizer
        net = torch.compile(run.net) if compiled else run.net  # compiles on the first (warm-up) step
        n = len(run.data.train_indices)
        needed = (spec["warmup"] + spec["steps"]) * cfg.batch_size
        keys = [(i % n, i) for i in range(needed)]  # (position, sample seed), as ShardSampler yields them
        loader = make_loader(Seeded(run.data.train, run.data.train_indices), keys, cfg.batch_size, cfg.workers,
                             run.info.device)
        stamps = []

        def after_step(global_step: int, b: int, stats: engine.EpochStats) -> bool:
            stamps.append(time.perf_counter())
            return global_step >= spec["warmup"] + spec["steps"]

        batches = ((images, masks, indices) for images, masks, indices, _ in loader)
        engine.train_one_epoch(net, batches, run.loss_fn, optimizer, None, run.scaler, device=run.info.device,
                               options=run.options, start=engine.EpochStart(batches=len(keys) // cfg.batch_size),
                               after_step=after_step)
        timed = stamps[spec["warmup"]:]
        start = stamps[spec["warmup"] - 1] if spec["warmup"] else None
        if start is None or not timed:
            raise SystemExit("train_speed: needs --warmup 1 or more and --steps 1 or more")
        seconds = timed[-1] - start
        return {"images_per_second": len(timed) * cfg.batch_size / seconds, "seconds": seconds, "compiled": compiled,
                "steps": len(timed), "batch_size": cfg.batch_size, "channels_last": cfg.channels_last,
                "exact_batch_norm": cfg.exact_batch_norm,
                "malloc": "reuse" if reusing_freed_memory() else "system", "flush_denormal": flushing,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "amp": run.amp, "optimizer_step": "plain" if step == "plain" else
                ("fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach")
                 else "plain"), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=RECIPE, help="the recipe (default: the CamVid CPU recipe)")
    parser.add_argument("--root", default="/work/shared/datasets/camvid", help="the dataset folder")
    parser.add_argument("--synthetic", action="store_true", help="random images and masks instead of the dataset")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="training crop (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the recipe's)")
    parser.add_argument("--configs", nargs="+", default=["before", "now"], choices=list(CONFIGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    from fcnseg.config import load_config

    recipe = load_config(args.config)
    size = tuple(args.size or recipe.crop_size)
    batch = args.batch_size or recipe.batch_size
    workers = recipe.workers if args.workers is None else args.workers
    with tempfile.TemporaryDirectory(prefix="fcnseg-synthetic-") as tmp:
        root = str(synthetic_folder(Path(tmp), max(2 * batch, 16), size)) if args.synthetic else args.root
        rows = []
        for name in args.configs:
            spec = {"config": str(args.config), "root": root, "synthetic": args.synthetic, "size": list(size),
                    "batch_size": batch, "workers": workers, "threads": args.threads, "steps": args.steps,
                    "warmup": args.warmup, "settings": CONFIGS[name]}
            print(f"running {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, env=dict(os.environ))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"train_speed: {name} failed: {tail}", file=sys.stderr)
                return 1
            rows.append((name, json.loads(lines[-1])))

    first = rows[0][1]
    print(f"\n{args.config.name}{' (synthetic data)' if args.synthetic else ''}: batch {batch}, {size[0]}x{size[1]}, "
          f"{first['threads']} threads, {args.steps} timed steps after {args.warmup}, torch {first['torch']}, "
          f"CPU capability {first['cpu_capability']}")
    def autocast(amp: dict) -> str:
        return amp["dtype"] + (f" (auto: {amp['reason']})" if amp.get("amp") == "auto" else "")

    width = max(8, *(len(autocast(r["amp"])) for _, r in rows))
    head = (f"{'configuration':<14} {'layout':<26} {'autocast':<{width}} {'optimizer':<9} {'malloc':<6} "
            f"{'peak MiB':>8} {'img/s':>7} {'x ' + rows[0][0]:>9}")
    print(head)
    print("-" * len(head))
    base = rows[0][1]["images_per_second"]
    for name, r in rows:
        layout = ("NCHW" if not r["channels_last"] else "channels-last, exact BN" if r.get("exact_batch_norm")
                  else "channels-last") + (" compiled" if r.get("compiled") else "") \
            + (", FTZ" if r.get("flush_denormal") else "")
        print(f"{name:<14} {layout:<26} {autocast(r['amp']):<{width}} {r['optimizer_step']:<9} {r['malloc']:<6} "
              f"{r['peak_rss_mib']:>8.0f} {r['images_per_second']:>7.2f} {r['images_per_second'] / base:>9.2f}")
    probe = next((r["amp"] for _, r in rows if "float32_step_s" in r["amp"]), None)
    if probe:
        print(f"amp auto's probe (forward and backward on a training-shaped batch): {probe['float32_step_s']} s float32, "
              f"{probe['bfloat16_step_s']} s bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
