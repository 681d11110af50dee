"""Evaluation speed against model speed: images/s of ``fcnseg evaluate``'s path (``evaluate_model``:
loading, optimized model, class ids, confusion matrix) next to ``fcnseg benchmark``'s model-only
images/s for the same model, image size, batch and dtype. The target is a ratio of 0.8 or more.

    OMP_NUM_THREADS=4 .venv/bin/python benchmarks/evaluate_speed.py --model camvid \
        --dataset camvid --root /work/shared/datasets/camvid --split val
    .venv/bin/python benchmarks/evaluate_speed.py --model fcn32s_efficientnet_lite0 --synthetic 8 --size 64 96  # smoke

The evaluate path is timed as a user meets it, loader worker start-up included (over a few images it
dominates); the one-off ``optimize`` is timed apart. Measure on a quiet machine: both numbers share
the CPU with whatever else runs. Each number is the median of ``--repeats`` measurements, taken in turn
(evaluate path, model only, evaluate path, ...): the model-only figure of one fresh process moved by up to
40% between processes on a 2-core EPYC, and a ratio of two single measurements moved with it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="camvid", help="checkpoint, built-in name, or registered architecture (random)")
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--root", default="/work/shared/datasets/camvid")
    p.add_argument("--split", default="val")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="instead of a dataset: N random normalised images of --size in memory (no loading cost)")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"), help="with --synthetic")
    p.add_argument("--num-classes", type=int, default=11, help="with --synthetic and a registered architecture")
    p.add_argument("--images", type=int, default=0, help="images to time (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both measurements (default: torch's)")
    p.add_argument("--iters", type=int, default=10, help="timed runs of the model-only benchmark")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each figure (the median counts)")
    args = p.parse_args()

    import fcnseg
    from fcnseg.evaluation.benchmark import benchmark
    from fcnseg.weights.checkpoint import resolve_checkpoint
    from fcnseg.evaluation.loop import evaluate_model
    from fcnseg.hardware import flush_denormal
    from fcnseg.inference.optimize import optimize

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        h, w = args.size
        dataset = [(torch.randn(3, h, w, generator=g), torch.randint(0, args.num_classes, (h, w), generator=g))
                   for _ in range(args.synthetic)]
        num_classes = args.num_classes
    else:
        from fcnseg.data import build_dataset

        dataset = build_dataset(args.dataset, args.root, args.split)
        num_classes = dataset.num_classes
        h, w = dataset[0][0].shape[-2:]
    n = min(args.images or len(dataset), len(dataset))

    with flush_denormal():  # as the fcnseg command and the benchmark worker run
        if args.model in fcnseg.list_models():
            torch.manual_seed(0)
            model, spec_model = fcnseg.build_model(args.model, num_classes=num_classes).eval(), args.model
        else:
            model, spec_model = fcnseg.load_checkpoint(args.model), str(resolve_checkpoint(args.model))
        t0 = time.perf_counter()
        model = optimize(model, args.dtype, inplace=True)  # once per evaluation: timed apart
        optimize_s = time.perf_counter() - t0
        common = dict(num_classes=num_classes, optimize_model=False, batch_size=args.batch_size, workers=args.workers)
        evaluate_model(model, dataset, indices=list(range(min(n, args.batch_size))), **common)  # warm-up

        def evaluate_path() -> float:
            t0 = time.perf_counter()
            evaluate_model(model, dataset, indices=list(range(n)), **common)
            return n / (time.perf_counter() - t0)

        def model_only(batch: int) -> float:
            return benchmark({"model": spec_model, "num_classes": num_classes, "dtype": args.dtype,
                              "size": [int(h), int(w)], "batch": batch, "warmup": 2, "iters": args.iters,
                              "threads": threads})["images_per_second"]

        # the reference is fcnseg benchmark as a user runs it (batch 1), and the model alone at the evaluated batch
        sizes = sorted({1, args.batch_size})
        evals, models = [], {b: [] for b in sizes}
        for _ in range(max(1, args.repeats)):
            evals.append(evaluate_path())
            for b in sizes:
                models[b].append(model_only(b))
    eval_ips = statistics.median(evals)
    model_ips = {b: statistics.median(v) for b, v in models.items()}
    best = max(model_ips.values())
    print(f"{args.model} {args.dtype} {h}x{w} batch {args.batch_size}, {threads} threads, {n} images "
          f"({'synthetic, in memory' if args.synthetic else f'{args.dataset} {args.split}, {args.workers} workers'}), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    def each(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    print(f"  evaluate path   {eval_ips:8.2f} images/s   median of {each(evals)} "
          f"(optimize once: {optimize_s:.2f} s, not included)")
    for b in sizes:
        print(f"  model only      {model_ips[b]:8.2f} images/s   median of {each(models[b])} "
              f"(fcnseg benchmark --batch {b}, a fresh process each)")
    print(f"  ratio           {eval_ips / best:8.2f}            (against the faster model-only batch; target >= 0.8)")


if __name__ == "__main__":
    main()
