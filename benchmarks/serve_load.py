"""Load and abuse test of ``fcnseg serve``: N concurrent clients on 127.0.0.1 for a bounded time (and
request count); prints p50/p95/p99 latency, throughput, status counts, wrong answers, the server's
peak and sampled memory, its mean batch size, and optionally ``fcnseg benchmark``'s images/s for the
same model, size and batch in the same run, for the ratio.

Every 200 answer is checked byte for byte against the mask PNG ``fcnseg predict`` would write for the
same image (computed here, before the load starts).

    OMP_NUM_THREADS=2 python benchmarks/serve_load.py --clients 8 --duration 60 --baseline
    OMP_NUM_THREADS=2 python benchmarks/serve_load.py --clients 32 --duration 120   # 4x overload soak
"""
from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

MAX_DURATION_S = 900  # a bound on how long this script may load the machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, key: str) -> float | None:
    """A /proc/PID/status memory line (VmRSS, VmHWM) in MB, or None (process gone, not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def test_image(path: str | None, size: tuple[int, int]) -> bytes:
    """PNG bytes of the given image, or of a smooth random picture of ``size`` (H, W)."""
    from PIL import Image

    if path:
        return Path(path).read_bytes()
    h, w = size
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def expected_mask_png(checkpoint: str, data: bytes) -> bytes:
    """What ``fcnseg predict`` writes for this image: read the same way, same Segmenter settings."""
    import tempfile

    from fcnseg.cli.predict import load_segmenter
    from fcnseg.data.io import read_image
    from fcnseg.inference.visualize import palette_image

    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(data)
        f.flush()
        image = read_image(f.name)
    seg = load_segmenter(checkpoint)
    buf = io.BytesIO()
    palette_image(seg(image), seg.colors).save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="camvid")
    parser.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"),
                        help="size of the synthetic test image (default 360 480)")
    parser.add_argument("--image", default=None, help="an image file to send instead of the synthetic one")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--duration", type=float, default=60.0, help=f"seconds of load (at most {MAX_DURATION_S})")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--workers-threads", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=30.0, help="the server's per-request deadline")
    parser.add_argument("--baseline", action="store_true",
                        help="also run `fcnseg benchmark` (same model, size, --max-batch) for the ratio")
    args = parser.parse_args()
    if not 0 < args.duration <= MAX_DURATION_S or args.clients < 1:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S}] and --clients at least 1")

    import httpx

    data = test_image(args.image, tuple(args.size))
    print("computing the expected mask ...", file=sys.stderr, flush=True)
    expected = expected_mask_png(args.checkpoint, data)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fcnseg", "serve", "--checkpoint", args.checkpoint, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(args.max_batch), "--workers-threads", str(args.workers_threads),
           "--max-queue", str(args.max_queue), "--timeout", str(args.timeout), "--log-level", "warning"]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                print(f"server exited with {server.returncode}", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("server did not come up within 180 s", file=sys.stderr)
                return 1
            time.sleep(0.5)

        lock = threading.Lock()
        statuses: Counter = Counter()
        latencies: list[float] = []
        wrong = 0
        sent = 0
        t_start = time.monotonic()
        t_measure = t_start + args.warmup
        t_end = t_measure + args.duration

        def client() -> None:
            nonlocal wrong, sent
            with httpx.Client(timeout=args.timeout + 30) as http:
                while time.monotonic() < t_end:
                    with lock:
                        if sent >= args.max_requests:
                            return
                        sent += 1
                    t0 = time.monotonic()
                    try:
                        r = http.post(f"{url}/v1/segment?format=mask", content=data)
                        status, ok = r.status_code, r.status_code != 200 or r.content == expected
                    except httpx.HTTPError as e:
                        status, ok = type(e).__name__, True
                    t1 = time.monotonic()
                    if t0 < t_measure:
                        continue
                    with lock:
                        statuses[status] += 1
                        if status == 200:
                            latencies.append(t1 - t0)
                        wrong += not ok
                    if status == 503:
                        time.sleep(0.05)  # a polite client backs off a little (the server says Retry-After)

        rss: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample_memory() -> None:
            while not stop.wait(1.0):
                value = proc_status(server.pid, "VmRSS")
                if value is not None:
                    rss.append((time.monotonic() - t_start, value))

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        sampler = threading.Thread(target=sample_memory)
        print(f"load: {args.clients} clients, {args.warmup:g} s warm-up + {args.duration:g} s ...", file=sys.stderr,
              flush=True)
        sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = min(time.monotonic(), t_end) - t_measure
        stop.set()
        sampler.join()
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        peak = proc_status(server.pid, "VmHWM")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    ok = statuses.get(200, 0)
    fives = {s: n for s, n in statuses.items() if isinstance(s, int) and s >= 500 and s not in (503, 504)}
    batch_sum = batch_count = 0.0
    for line in metrics.splitlines():
        if line.startswith("fcnseg_batch_size_sum "):
            batch_sum = float(line.split()[1])
        elif line.startswith("fcnseg_batch_size_count "):
            batch_count = float(line.split()[1])
    from PIL import Image

    w, h = Image.open(io.BytesIO(data)).size
    print(f"serve_load: {args.checkpoint}, {h}x{w} image of {len(data)} bytes, {args.clients} clients, max batch {args.max_batch}, "
          f"{args.workers_threads} worker thread(s), {elapsed:.1f} s measured")
    print(f"  answered 200: {ok}   throughput: {ok / elapsed:.2f} images/s")
    print(f"  latency of 200s: p50 {1000 * percentile(latencies, 50):.0f} ms   p95 "
          f"{1000 * percentile(latencies, 95):.0f} ms   p99 {1000 * percentile(latencies, 99):.0f} ms")
    print(f"  status counts: {dict(sorted(statuses.items(), key=str))}")
    print(f"  wrong answers (200 with a mask unlike fcnseg predict's): {wrong}")
    print(f"  5xx other than 503/504: {sum(fives.values())}")
    print(f"  mean batch size: {batch_sum / batch_count:.2f}" if batch_count else "  mean batch size: n/a")
    if rss:
        third = max(1, len(rss) // 3)
        early, late = np.mean([v for _, v in rss[:third]]), np.mean([v for _, v in rss[-third:]])
        print(f"  server memory: peak (VmHWM) {peak or float('nan'):.0f} MB; RSS first third {early:.0f} MB, "
              f"last third {late:.0f} MB (growth {late - early:+.0f} MB)")
    if args.baseline:
        from fcnseg.evaluation.benchmark import benchmark
        from fcnseg.weights.checkpoint import resolve_checkpoint

        print("running fcnseg benchmark for the baseline ...", file=sys.stderr, flush=True)
        r = benchmark({"model": str(resolve_checkpoint(args.checkpoint)), "size": [h, w], "batch": args.max_batch,
                       "warmup": 2, "iters": 10})
        ips = r["images_per_second"]
        print(f"  fcnseg benchmark --batch {args.max_batch} at {h}x{w}: {ips:.2f} images/s; "
              f"serve / benchmark = {ok / elapsed / ips:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
