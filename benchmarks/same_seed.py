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
are gone, to the summary only. ``--control A B`` (repeatable) shows the old loop against itself: two "before"
runs of one seed that differ only in where their sums round (``threads``, e.g. ``--threads 1``), the spread a
same-seed comparison has without any change to the loop; controls are shown apart and not counted as pairs.

    fcnseg train ... --out runs/before3t1 --seed 3 --no-amp --no-channels-last --threads 1
    python benchmarks/same_seed.py runs/before3 runs/now3 --control runs/before3 runs/before3t1
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
REPORT_KEYS = {"out", "root", "progress", "plots", "workers", "time_budget_min"}
FREE_KEYS = SPEED_KEYS | REPORT_KEYS
# what the two runs of a control (the old loop against itself) may differ in: where their sums round, and
# exact_batch_norm, which only acts on channels-last tensors
CONTROL_KEYS = REPORT_KEYS | {"threads", "exact_batch_norm"}


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


def _differ(a: dict[str, Any], b: dict[str, Any], free: set[str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))


def _old_loop(run: dict[str, Any]) -> None:
    if run["config"].get("amp") is not False or run["config"].get("channels_last"):
        raise PairError(f"{run['path']}: a 'before' run trains with --no-amp --no-channels-last")


def check_pair(before: dict[str, Any], now: dict[str, Any]) -> None:
    """The two runs must share every setting but the speed (and reporting) ones, and "before" must be the old loop."""
    differ = _differ(before["config"], now["config"], FREE_KEYS)
    if differ:
        raise PairError(f"{before['path']} and {now['path']} differ in {', '.join(differ)}: a same-seed pair differs "
                        f"only in {', '.join(sorted(SPEED_KEYS))}")
    _old_loop(before)


def check_control(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Both runs are the old loop, and they differ in nothing but where their sums round (and reporting)."""
    _old_loop(a)
    _old_loop(b)
    differ = _differ(a["config"], b["config"], CONTROL_KEYS)
    if differ:
        raise PairError(f"{a['path']} and {b['path']} differ in {', '.join(differ)}: a control differs only in "
                        f"{', '.join(sorted(CONTROL_KEYS))}")


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


def _threads(run: dict[str, Any]) -> str:
    n = run["config"].get("threads")
    return f"{n} thread{'' if n == 1 else 's'}"


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
    p.add_argument("--control", nargs=2, type=Path, action="append", default=[], metavar=("A", "B"),
                   help="two 'before' runs of one seed that differ only in threads: the old loop against itself")
    p.add_argument("--tolerance", type=float, default=0.5, help="the accuracy target, in mean IU points")
    args = p.parse_args(argv)
    if len(args.runs) % 2:
        p.error(f"{len(args.runs)} run directories: give them in pairs, BEFORE NOW")
    try:
        runs = [read_run(path) for path in args.runs]
        pairs = list(zip(runs[::2], runs[1::2]))
        for before, now in pairs:
            check_pair(before, now)
        controls = [(read_run(a), read_run(b)) for a, b in args.control]
        for a, b in controls:
            check_control(a, b)
    except PairError as e:
        print(f"same_seed: {e}", file=sys.stderr)
        return 2

    print("| run | seed | layout | precision | s / epoch (median) | img/s (median) | wall s | val mIU by epoch | "
          "final | pixel acc. |")
    print("|---|---:|---|---|---:|---:|---:|---|---:|---:|")
    def row(s: dict[str, Any], seed) -> None:
        by_epoch = " / ".join(f"{v:.2f}" for v in s["val"].values())
        print(f"| {s['name']} | {seed} | {s['layout']} | {s['precision']} | {s['s_epoch']:.1f} | {s['img_s']:.2f} | "
              f"{s['wall_s']:.0f} | {by_epoch} | **{s['final']:.2f}** | {s['pa']:.2f} |")

    diffs = []
    for before, now in pairs:
        seed = before["config"].get("seed")
        s_b, s_n = summarise(before), summarise(now)
        row(s_b, seed)
        row(s_n, seed)
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
    if controls:
        print("\nthe old loop against itself (same seed, other threads):")
    for a, b in controls:
        s_a, s_b = summarise(a), summarise(b)
        print(f"  seed {a['config'].get('seed')}: {s_a['name']} ({_threads(a)}) {s_a['final']:.2f}, "
              f"{s_b['name']} ({_threads(b)}) {s_b['final']:.2f}: {s_b['final'] - s_a['final']:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
