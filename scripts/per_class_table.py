"""Maintainer tool: the markdown tables of docs/results.md from ``fcnseg evaluate --json`` output.

    python scripts/per_class_table.py EVAL.json

Prints the four paper metrics and a per-class table (IoU, accuracy, ground-truth share), all in %.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_json", type=Path)
    args = ap.parse_args()
    s = json.loads(args.eval_json.read_text())
    print("| pixel acc. | mean acc. | mean IU | f.w. IU |")
    print("|---:|---:|---:|---:|")
    print(f"| {pct(s['pixel_accuracy'])} | {pct(s['mean_accuracy'])} | {pct(s['mean_iou'])} | {pct(s['fw_iou'])} |")
    print()
    total = sum(c["gt_pixels"] for c in s["per_class"]) or 1
    excluded = set(s.get("excluded", []))
    print("| class | IoU | accuracy | share of pixels |")
    print("|---|---:|---:|---:|")
    for c in s["per_class"]:
        note = " (absent, excluded)" if c["name"] in excluded else ""
        iou = None if c["name"] in excluded else c["iou"]
        acc = None if c["name"] in excluded else c["accuracy"]
        print(f"| {c['name']}{note} | {pct(iou)} | {pct(acc)} | {100 * c['gt_pixels'] / total:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
