"""Does the faster training loop keep the accuracy? Same-seed pairs of finished runs, side by side.

Each pair is two run directories of one recipe and one seed: "before" trained with ``--no-amp
--no-channels-last`` (the loop as it was before issue 16: NCHW float32) and "now" with ``fcnseg train``'s
defaults. The script checks that the two differ only in the speed settings, then prints each run's speed and
validation mean IU, each pair's speed-up and final difference, and over all pairs the mean difference with its
95% interval (Student's t), since one pair cannot tell a real change from the spread between runs whose
convolutions sum in a different order.

    fcnseg train --config configs/camvid_fcn8s_efficientnet_lite0_cpu.yaml --root $CAMVID --out runs/before3 \\
        --epochs 15 --time-budget-min 0 --seed 3 --no-amp --no-channels-last
    fcnseg train --config configs/camvid_fcn8s_efficientnet_lite0_cpu.yaml --root $CAMVID --out runs/now3 \\
        --epochs 15 --time-budget-min 0 --seed 3
    python benchmarks/same_seed.py runs/before3 runs/now3 [runs/before4 runs/now4 ...] [--also 70.76:70.23 ...]

``--also BEFORE:NOW`` adds the final val mean IU (in points) of pairs measured earlier whose run directories
are gone, to the summary only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# the settings a pair may differ in: the speed settings under test, and where and how a run reports
SPEED_KEYS = {"amp", "amp_dtype", "channels_last", "exact_batch_norm"}
FREE_KEYS = SPEED_KEYS | {"out", "root", "progress", "plots", "workers", "time_budget_min"}


class PairError(Exception):
    """A run directory or pair that cannot be compared; the message is one line."""


def read_run(path: Path) -> dict[str, Any]:
    """A finished run directory as ``{"config", "rows", "amp", "path"}``."""
    import yaml

    files = {name: path / name for name in ("config.yaml", "metrics.jsonl", "version.json")}
    for name, f in files.items():
        if not f.is_file():
            raise PairError(f"{path}: no {name} (is this an fcnseg run directory?)")
    try:
        config = yaml.safe_load(files["config.yaml"].read_text())
        rows = [json.loads(line) for line in files["metrics.jsonl"].read_text().splitlines() if line.strip()]
        amp = json.loads(files["version.json"].read_text()).get("amp") or {}
    except (ValueError, yaml.YAMLError) as e:
        raise PairError(f"{path}: unreadable run files ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or not rows:
        raise PairError(f"{path}: empty config.yaml or metrics.jsonl")
    if rows[-1].get("epoch") != config.get("epochs") or "val" not in rows[-1]:
        raise PairError(f"{path}: the run has not finished ({rows[-1].get('epoch')} of {config.get('epochs')} "
                        f"epochs, last one validated: {'val' in rows[-1]})")
    return {"config": config, "rows": rows, "amp": amp, "path": path}


def check_pair(before: dict[str, Any], now: dict[str, Any]) -> None:
    """The two runs must share every setting but the speed (and reporting) ones, and "before" must be the old loop."""
    a, b = before["config"], now["config"]
    differ = sorted(k for k in set(a) | set(b) if k not in FREE_KEYS and a.get(k) != b.get(k))
    if differ:
        raise PairError(f"{before['path']} and {now['path']} differ in {', '.join(differ)}: a same-seed pair differs "
                        f"only in {', '.join(sorted(SPEED_KEYS))}")
    if a.get("amp") is not False or a.get("channels_last"):
        raise PairError(f"{before['path']}: a 'before' run trains with --no-amp --no-channels-last")


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    rows, cfg = run["rows"], run["config"]
    val = {r["epoch"]: r["val"] for r in rows if "val" in r}
    layout = ("NCHW" if not cfg.get("channels_last") else
              "channels-last" + (", exact batch norm" if cfg.get("exact_batch_norm") else ""))
    return {"name": run["path"].name, "layout": layout,
            "precision": run["amp"].get("dtype", "float32"),
            "s_epoch": statistics.median(r["seconds"] for r in rows),
            "img_s": statistics.median(r["images_per_s"] for r in rows),
            "wall_s": rows[-1]["elapsed_s"],
            "val": {e: 100 * v["mean_iou"] for e, v in val.items()},
            "final": 100 * rows[-1]["val"]["mean_iou"], "pa": 100 * rows[-1]["val"]["pixel_accuracy"]}


def interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean, and the two-sided ``level`` interval of the mean by Student's t (n >= 2)."""
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    half = t.ppf(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


def parse_also(text: str) -> tuple[float, float]:
    try:
        before, now = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BEFORE:NOW, two mean IUs in points (e.g. 70.76:70.23)")
    return before, now


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories in pairs: BEFORE NOW [BEFORE NOW ...]")
    p.add_argument("--also", nargs="*", type=parse_also, default=[], metavar="BEFORE:NOW",
                   help="final val mean IUs (points) of earlier pairs, added to the summary")
    p.add_argument("--tolerance", type=float, default=0.5, help="the accuracy target, in mean IU points")
    args = p.parse_args(argv)
    if len(args.runs) % 2:
        p.error(f"{len(args.runs)} run directories: give them in pairs, BEFORE NOW")
    try:
        runs = [read_run(path) for path in args.runs]
        pairs = list(zip(runs[::2], runs[1::2]))
        for before, now in pairs:
            check_pair(before, now)
    except PairError as e:
        print(f"same_seed: {e}", file=sys.stderr)
        return 2

    print("| run | seed | layout | precision | s / epoch (median) | img/s (median) | wall s | val mIU by epoch | "
          "final | pixel acc. |")
    print("|---|---:|---|---|---:|---:|---:|---|---:|---:|")
    diffs = []
    for before, now in pairs:
        seed = before["config"].get("seed")
        s_b, s_n = summarise(before), summarise(now)
        for s in (s_b, s_n):
            by_epoch = " / ".join(f"{v:.2f}" for v in s["val"].values())
            print(f"| {s['name']} | {seed} | {s['layout']} | {s['precision']} | {s['s_epoch']:.1f} | {s['img_s']:.2f} | "
                  f"{s['wall_s']:.0f} | {by_epoch} | **{s['final']:.2f}** | {s['pa']:.2f} |")
        diffs.append(s_n["final"] - s_b["final"])
        print(f"| pair, seed {seed} | | | | {s_b['s_epoch'] / s_n['s_epoch']:.2f}x | {s_n['img_s'] / s_b['img_s']:.2f}x | "
              f"{s_b['wall_s'] / s_n['wall_s']:.2f}x | | **{diffs[-1]:+.2f}** | |")
    diffs += [now - before for before, now in args.also]
    within = sum(abs(d) <= args.tolerance for d in diffs)
    print(f"\n{len(diffs)} pair(s), final val mIU now - before: {', '.join(f'{d:+.2f}' for d in diffs)}; "
          f"{within} of {len(diffs)} within {args.tolerance} points")
    if len(diffs) >= 2:
        mean, lo, hi = interval(diffs)
        print(f"mean {mean:+.2f} points, 95% interval [{lo:+.2f}, {hi:+.2f}], standard deviation "
              f"{statistics.stdev(diffs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
