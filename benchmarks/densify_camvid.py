"""Densification methods on CamVid val, as the paper's section 3.2 compares them: accuracy and cost of

  (a) FCN-8s: learned (deconvolution) upsampling with skips: the built-in ``camvid`` model as released;
  (b) FCN-32s with fixed bilinear upsampling on the same backbone: ``--fcn32s CHECKPOINT`` (fine-tune one
      with configs/camvid_fcn32s_bilinear_efficientnet_lite0_cpu.yaml); without it, the built-in model's
      trunk and coarse score layer with its skips dropped ("derived", not trained as a 32s net: a lower bound);
  (c) shift-and-stitch and filter rarefaction (fcnseg.models.dense) applied to (b) at ``--stride`` (8 or 16),
      then bilinear upsampling by the stride. Shift-and-stitch runs (32/stride)^2 passes.

Mean IU etc. on the first ``--limit`` val images (0 = all 101) at the original 360 x 480, batch 1.
Seconds per image and peak memory: ``fcnseg.evaluation.benchmark`` (a fresh process per row, warm-up, median of
``--iters`` runs at 360 x 480; peak = resident high-water mark minus the process after imports).

    OMP_NUM_THREADS=2 python benchmarks/densify_camvid.py --root /path/to/camvid --limit 0 --json densify.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROWS = ("fcn8s", "fcn32s", "shift-and-stitch", "rarefaction")
DERIVED = "derived (trunk + coarse scores of the FCN-8s, untrained as 32s)"


def derived_fcn32s(checkpoint: str) -> torch.nn.Module:
    """The checkpoint's trunk and coarse score layer as an FCN-32s with fixed bilinear upsampling."""
    from fcnseg.weights.checkpoint import load_checkpoint
    from fcnseg.models import transfer_weights
    from fcnseg.registry import build_model

    src = load_checkpoint(checkpoint)
    arch = src.arch.replace("fcn8s", "fcn32s").replace("fcn16s", "fcn32s")
    model = build_model(arch, num_classes=src.num_classes, upsample="bilinear")
    transfer_weights(model, src)
    model.record = {**src.record, "arch": arch, "derived_from": str(checkpoint)}
    return model.eval()


def build(row: str, checkpoint: str = "camvid", fcn32s: str | None = None, stride: int = 8) -> torch.nn.Module:
    """The model of one table row (also the factory ``fcnseg.evaluation.benchmark`` calls in its fresh process)."""
    from fcnseg.weights.checkpoint import load_checkpoint
    from fcnseg.models.dense import densify

    if row == "fcn8s":
        return load_checkpoint(checkpoint)
    coarse = load_checkpoint(fcn32s) if fcn32s else derived_fcn32s(checkpoint)
    if row == "fcn32s":
        return coarse
    dense = densify(coarse, row, stride)
    return dense.eval()


def accuracy(model: torch.nn.Module, root: str, limit: int) -> dict:
    """Scores on the first ``limit`` CamVid val images, with the checkpoint's own normalisation."""
    from fcnseg.data import build_dataset, build_transforms
    from fcnseg.evaluation.metrics import ConfusionMatrix

    dataset = build_dataset("camvid", root, "val")
    norm = model.record.get("normalization", {})
    if "mean" in norm:
        dataset.transforms = build_transforms("camvid", train=False, mean=norm["mean"], std=norm["std"])
    n = min(limit, len(dataset)) if limit else len(dataset)
    cm = ConfusionMatrix(model.num_classes, dataset.ignore_index)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            image, mask = dataset[i]
            cm.update(mask[None], model(image[None]).argmax(1))
    scores = cm.compute(class_names=list(dataset.classes))
    return {"images": n, "eval_seconds_per_image": (time.perf_counter() - start) / max(n, 1),
            **{k: scores[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")}}


def cost(row: str, args: argparse.Namespace) -> dict:
    from fcnseg.evaluation.benchmark import benchmark

    spec = {"model": "densify_camvid:build", "size": [360, 480], "warmup": 1, "iters": args.iters,
            "threads": args.threads or None,
            "factory_kwargs": {"row": row, "checkpoint": args.checkpoint, "fcn32s": args.fcn32s, "stride": args.stride}}
    here = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    r = benchmark(spec, env=env)
    return {"seconds_per_image": r["latency_ms_median"] / 1000, "peak_memory_mb": r["peak_memory_mb"],
            "gflops": (r["gflops_per_second"] or 0) * r["latency_ms_median"] / 1000 or None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="CamVid folder")
    p.add_argument("--checkpoint", default="camvid", help="the FCN-8s of row (a) (default: the built-in camvid)")
    p.add_argument("--fcn32s", default=None, help="FCN-32s bilinear checkpoint for rows (b), (c) (default: derived)")
    p.add_argument("--stride", type=int, default=8, help="output stride of the dense rows (8 or 16)")
    p.add_argument("--limit", type=int, default=0, help="first N val images (0: all)")
    p.add_argument("--iters", type=int, default=5, help="timed runs per row")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--json", type=Path, help="write the table as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    table = []
    for row in args.rows:
        model = build(row, args.checkpoint, args.fcn32s, args.stride)
        entry = {"row": row, "stride": args.stride if row in ("shift-and-stitch", "rarefaction") else
                 (8 if row == "fcn8s" else 32), "passes": getattr(model, "passes", 1),
                 "fcn32s": "given" if args.fcn32s else DERIVED}
        del model
        entry |= accuracy(build(row, args.checkpoint, args.fcn32s, args.stride), args.root, args.limit)
        entry |= cost(row, args)
        table.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)

    print(f"{table[0]['images']} CamVid val images; FCN-32s: {table[0]['fcn32s']}")
    print("| method | output stride | passes | mean IU | pixel acc. | s / image | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for e in table:
        print(f"| {e['row']} | {e['stride']} | {e['passes']} | {100 * e['mean_iou']:.1f} | "
              f"{100 * e['pixel_accuracy']:.1f} | {e['seconds_per_image']:.3f} | {e['peak_memory_mb']:.0f} |")
    if args.json:
        from fcnseg.files import atomic_write

        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
