"""Training curves of one run, or of consecutive stages of one model (``--init-from``), as one plot.

    python scripts/plot_curves.py runs/siftflow-lite0 --out docs/img/curves_sf.png
    python scripts/plot_curves.py runs/stage1 runs/stage2 --out curves.png   # stage 2 started with --init-from

Each run's ``metrics.jsonl`` holds one row per epoch; a later stage's epochs are numbered on from the
earlier stage's last one, and a dashed line marks where each stage begins.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fcnseg.train.report import plot_curves


def stage_history(runs: list[Path]) -> tuple[list[dict], list[int]]:
    """Rows of every run in order, epochs renumbered to run on; the first epoch of each later stage."""
    rows, starts, offset = [], [], 0
    for run in runs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise SystemExit(f"plot_curves: {path}: no such file (is {run} a training run?)")
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            starts.append(offset + 1)
        rows += [dict(h, epoch=h["epoch"] + offset) for h in history]
        offset = rows[-1]["epoch"] if rows else offset
    return rows, starts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories, earliest stage first")
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    args = ap.parse_args()
    rows, starts = stage_history(args.runs)
    plot_curves(rows, args.out, stage_starts=starts)
    print(f"wrote {args.out} ({len(rows)} epochs from {len(args.runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
