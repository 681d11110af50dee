"""Plain ``fcnseg predict`` against ``--engine ray`` with 1 and 2 workers: start-up, steady-state images/s, memory.

Each variant runs the real command in a child process on the same images; the benchmark watches it from outside:
start-up is the time to the first finished image (output PNGs for plain predict, manifest.jsonl rows for Ray),
steady state the images/s between 10% and 90% of the job, and memory the peak resident size of each process that
holds a model (the predict process; each Ray actor). Timings need quiet cores: do not run it on a shared machine
except as a smoke test (``--images 8``).

    python benchmarks/ray_predict.py --images 2000                       # CamVid frames at 360x480
    python benchmarks/ray_predict.py --images 8 --source synthetic       # smoke test
    python benchmarks/ray_predict.py --memory 1000 10000 100000          # memory against the number of inputs

``--memory`` runs ``--engine ray`` (2 workers x 1 thread) on text manifests of N paths to one small synthetic image
(hard links, so N files cost no disk) and samples, twice a second, the resident size of the driver (the predict
process), of each actor and of the whole process tree (Ray's own daemons included), reporting each peak and the
driver's size at 25%, 50% and 75% of the job: flat memory means those do not grow with N. Memory does not need
quiet cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CAMVID = Path("/work/shared/datasets/camvid")


def images(source: str, n: int, folder: Path) -> list[Path]:
    """``n`` images in ``folder``: CamVid frames (360x480, copied again when fewer) or synthetic ones."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    frames = sorted(Path(source).rglob("*.png")) if source != "synthetic" else []
    frames = [f for f in frames if "annot" not in str(f).lower() and "label" not in str(f).lower()]
    out = []
    for i in range(n):
        dst = folder / f"frame{i:06d}.png"
        if frames:  # copies: predict takes a file once however many links lead to it
            shutil.copyfile(frames[i % len(frames)], dst)
        else:
            rng = np.random.default_rng(i)
            small = rng.integers(0, 256, (46, 61, 3), dtype=np.uint8)
            Image.fromarray(small).resize((480, 360), Image.BILINEAR).save(dst)
        out.append(dst)
    return out


def descendants(pid: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run(variant: str, inputs: Path, n: int, out: Path, threads: int) -> dict:
    """One variant, watched every 50 ms: finished-image times, and the peak RSS of each model-holding process."""
    cmd = [sys.executable, "-m", "fcnseg", "predict", str(inputs), "--out", str(out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if variant != "plain":
        workers = int(variant.split("x")[0])
        cmd += ["--engine", "ray", "--num-workers", str(workers), "--worker-threads", str(max(1, threads // workers))]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[float] = []
    peaks: dict[int, float] = {}
    holders: list[int] = [proc.pid]
    ticks = 0
    while proc.poll() is None:
        if variant == "plain":
            count = sum(1 for p in out.glob("frame*.png")) if out.exists() else 0
        else:
            journal = out / "manifest.jsonl"
            count = len(journal.read_bytes().splitlines()) if journal.exists() else 0
            if ticks % 10 == 0:  # the process tree is walked once a second: the watcher must stay cheap
                holders = [p for p in descendants(proc.pid) if "_Predictor" in cmdline(p)]
        now = time.perf_counter() - start
        seen += [now] * (count - len(seen))
        for p in holders:
            peaks[p] = max(peaks.get(p, 0.0), rss_mb(p))
        ticks += 1
        time.sleep(0.1)
    total = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: exit {proc.returncode}: {stderr.strip().splitlines()[-1:]}")
    written = len(list(out.glob("frame*.png")))
    if written != n:  # a steady state over images that were never segmented would be made up
        raise SystemExit(f"{variant}: wrote {written} masks for {n} images")
    seen += [total] * (n - len(seen))
    # images/s between the 10% and 90% marks; results arrive in blocks, so a job of a few blocks has no
    # steady state to speak of (None)
    lo, hi = int(0.1 * n), min(n - 1, max(int(0.9 * n), int(0.1 * n) + 1))
    span = seen[hi] - seen[lo]
    steady = (hi - lo) / span if span > 0.5 else None
    return dict(variant=variant, images=n, startup_s=seen[0], total_s=total, steady_ips=steady,
                rss_mb=sorted(round(v) for v in peaks.values()))


def memory_run(n: int, work: Path, side: int = 24) -> dict:
    """``--engine ray`` over a manifest of ``n`` paths; peak RSS of driver, actors and tree, and the driver's RSS
    as the job progresses."""
    import numpy as np
    from PIL import Image

    folder = work / f"mem-{n}"
    folder.mkdir(parents=True)
    first = folder / "im0000000.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(first)
    for i in range(1, n):
        if i % 50000 == 0:  # a file system allows so many links to one file (ext4: 65,000)
            first = folder / f"im{i:07d}.png"
            shutil.copyfile(folder / "im0000000.png", first)
            continue
        os.link(first, folder / f"im{i:07d}.png")
    listing = work / f"mem-{n}.txt"
    listing.write_text("".join(f"{folder.name}/im{i:07d}.png\n" for i in range(n)))
    out = work / f"mem-{n}-out"
    cmd = [sys.executable, "-m", "fcnseg", "predict", str(listing), "--out", str(out), "--quiet", "--engine", "ray",
           "--num-workers", "2", "--worker-threads", "1"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    driver = actor = tree = 0.0
    line_bytes = 0
    by_progress: dict[int, float] = {}
    while proc.poll() is None:
        kids = descendants(proc.pid)
        sizes = {p: rss_mb(p) for p in kids}
        d = rss_mb(proc.pid)
        driver, tree = max(driver, d), max(tree, d + sum(sizes.values()))
        actor = max([actor] + [v for p, v in sizes.items() if "_Predictor" in cmdline(p)])
        journal = out / "manifest.jsonl"
        size = journal.stat().st_size if journal.exists() else 0
        if size and not line_bytes:
            with open(journal, "rb") as f:
                line_bytes = len(f.readline())
        if size and line_bytes:
            rows = size / line_bytes  # the rows are alike: reading 100,000 of them twice a second would skew the run
            for q in (25, 50, 75):
                if q not in by_progress and rows >= n * q / 100:
                    by_progress[q] = d
        time.sleep(0.5)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"--memory {n}: exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return dict(n=n, seconds=time.perf_counter() - start, driver=driver, actor=actor, tree=tree,
                progress=by_progress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--source", default=str(CAMVID), help="a folder of frames (searched for *.png) or 'synthetic'")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in all (default: CPUs)")
    ap.add_argument("--variants", nargs="+", default=["plain", "1x", "2x"], help="plain, 1x (1 worker), 2x, ...")
    ap.add_argument("--memory", type=int, nargs="+", metavar="N", help="measure memory on manifests of N paths")
    args = ap.parse_args()
    import torch

    if args.memory:
        print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} CPUs; --engine ray, "
              f"2 workers x 1 thread, 24x24 images")
        print("| paths | wall s | driver RSS at 25% / 50% / 75% (MB) | peak driver (MB) | peak actor (MB) | "
              "peak tree (MB) |")
        print("|---|---|---|---|---|---|", flush=True)
        work = Path(tempfile.mkdtemp(prefix="fcnseg-bench-ray-mem-"))
        try:
            for n in args.memory:  # each row as it is measured: a long run cut short keeps the rows before
                r = memory_run(n, work)
                marks = " / ".join(f"{r['progress'][q]:.0f}" if q in r["progress"] else "-" for q in (25, 50, 75))
                print(f"| {r['n']} | {r['seconds']:.0f} | {marks} | {r['driver']:.0f} | {r['actor']:.0f} | "
                      f"{r['tree']:.0f} |", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return

    work = Path(tempfile.mkdtemp(prefix="fcnseg-bench-ray-"))
    try:
        inputs = work / "in"
        images(args.source if Path(args.source).exists() else "synthetic", args.images, inputs)
        rows = [run(v, inputs, args.images, work / f"out-{v}", args.threads) for v in args.variants]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} CPUs; "
          f"{args.threads} torch threads in all; {args.images} images")
    print("| variant | start-up s | steady images/s | total s | peak RSS per model process (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ips = "n/a" if r["steady_ips"] is None else f"{r['steady_ips']:.2f}"
        print(f"| {r['variant']} | {r['startup_s']:.1f} | {ips} | {r['total_s']:.1f} | "
              f"{', '.join(map(str, r['rss_mb']))} |")


if __name__ == "__main__":
    main()
