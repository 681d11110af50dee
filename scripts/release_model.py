"""Maintainer tool: turn a training run into a built-in model shipped inside the package.

    python scripts/release_model.py RUN_DIR NAME --eval-json EVAL.json --eval-command "fcnseg evaluate ..."

Writes src/fcnseg/weights/NAME.safetensors (float16, a few MB) whose record carries the classes,
colours, preprocessing, the training command, its wall time and throughput, and the validation
metrics measured by ``fcnseg evaluate`` on the released file; NAME.json beside it adds the sha256.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from fcnseg.files import atomic_write, file_digest
from fcnseg.weights.checkpoint import WEIGHTS_DIR, load_checkpoint, save_checkpoint

METRIC_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")


def run_timing(run: Path) -> dict:
    """Training wall time and images per second from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    out = {"epochs": last.get("epoch"), "steps": last.get("step")}
    if "elapsed_s" in last:
        out["wall_time_s"] = float(last["elapsed_s"])
    else:  # runs from before metrics.jsonl had elapsed_s: the resume state keeps the wall time
        state = torch.load(run / "checkpoints" / "state-last.pt", map_location="cpu", weights_only=True)
        out["wall_time_s"] = round(float(state["trained_s"]), 1)
    ips = [r["images_per_s"] for r in rows if "images_per_s" in r]
    if ips:
        out["train_images_per_second"] = round(sum(ips) / len(ips), 2)
    return out


def selected_on(record: dict, prov: dict) -> dict | None:
    """How the checkpoint was chosen, when its run chose on a shipped dev split: the split, the criterion, the
    split lists' SHA-256 and the chosen epoch's scores on dev (the training run's own evaluation, kept in the
    record before the reported figures replace them); None for a run that validated on anything else."""
    config = prov.get("config") or {}
    split, dataset = config.get("val_split"), config.get("dataset")
    metrics = record.get("metrics") or {}
    if split != "dev" or metrics.get("split") != "dev":
        return None
    from fcnseg.data.dev import split_digests

    return {"split": "dev", "by": "mean IU, evaluated every eval_every epochs and at the last (best.safetensors)",
            "epoch": metrics.get("epoch"), "lists_sha256": split_digests(dataset),
            "scores": {k: metrics[k] for k in METRIC_KEYS if k in metrics}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("name")
    ap.add_argument("--which", default="best", choices=("best", "last"))
    ap.add_argument("--eval-json", type=Path, help="fcnseg evaluate --json output for the released weights")
    ap.add_argument("--eval-command", default="", help="the evaluate command that produced --eval-json")
    ap.add_argument("--tta-eval-json", type=Path, help="the same evaluation with --flip/--scales (optional)")
    ap.add_argument("--tta-eval-command", default="", help="the evaluate command that produced --tta-eval-json")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--stage-of", type=Path, action="append", default=[], metavar="RUN_DIR",
                    help="an earlier run this one started from (--init-from): its command and wall time count too")
    args = ap.parse_args()

    model = load_checkpoint(args.run / "checkpoints" / f"{args.which}.safetensors")
    record = dict(model.record)
    prov = dict(record.get("provenance", {}))
    prov.update(run_timing(args.run))
    if isinstance(prov.get("command"), list):
        prov["command"] = shlex.join(prov["command"])
    stages = []
    for earlier in args.stage_of:  # staged training: the whole recipe is every stage's command and time
        version = json.loads((earlier / "version.json").read_text())
        timing = run_timing(earlier)
        stages.append({"run": earlier.name, "command": shlex.join(version["command"]), **timing})
        prov["wall_time_s"] = round(prov["wall_time_s"] + timing["wall_time_s"], 1)
    if stages:
        prov["stages"] = stages
    prov["released_from"] = f"{args.run.name}/checkpoints/{args.which}.safetensors"
    record["provenance"] = prov
    selection = selected_on(record, prov)
    if args.eval_json:
        scores = json.loads(args.eval_json.read_text())
        if selection and scores.get("split") == selection["split"]:
            raise SystemExit(f"--eval-json scores the {selection['split']} split that chose the checkpoint; "
                             f"report another split (val)")
        record["metrics"] = {k: scores[k] for k in METRIC_KEYS}
        record["metrics"]["per_class_iou"] = {c["name"]: c["iou"] for c in scores["per_class"]}
        record["metrics"]["split"] = scores.get("split", record.get("metrics", {}).get("split"))
        record["metrics"]["command"] = args.eval_command
        record["metrics"]["excluded"] = scores.get("excluded", [])
        if selection:
            record["metrics"]["selected_on"] = selection
    if args.tta_eval_json:
        scores = json.loads(args.tta_eval_json.read_text())
        record["metrics"]["with_tta"] = {**{k: scores[k] for k in METRIC_KEYS}, **scores["tta"],
                                         "command": args.tta_eval_command}
    dtype = getattr(torch, args.dtype)
    path = save_checkpoint(model, WEIGHTS_DIR / f"{args.name}.safetensors", record,
                           dtype=dtype if dtype != torch.float32 else None)
    digest = file_digest(path)
    side = dict(record, sha256=digest, file=path.name)
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(side, indent=2) + "\n"))
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
