"""``fcnseg predict``: segment image files, folders and globs into palette PNGs (and overlays, probabilities)."""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import Callable

from ..data.io import IMAGE_SUFFIXES
from ..errors import printable, show_path
from . import add_progress_argument, hold_output


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="segment images: palette PNG of class ids per image, optional overlay and probabilities",
                       description="Segment images. For each INPUT writes OUT/<stem>.png (palette PNG of class ids at "
                                   "the input's size), and OUT/legend.png once; a multi-head checkpoint writes "
                                   "OUT/<stem>_<head>.png per head and OUT/legend_<head>.png. Existing files are never replaced "
                                   "unless --overwrite: they are reported and skipped (exit 1).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (their images) or glob patterns")
    p.add_argument("--checkpoint", default="camvid",
                   help="built-in name, .safetensors checkpoint, run directory, or .onnx file (default: camvid)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace predictions already in --out (default: report and skip them, exit 1)")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg: colours blended over the image")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight (default 0.5)")
    p.add_argument("--probs", action="store_true", help="also write <stem>_probs.npy: float16 (K, H, W) probabilities")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default=None,
                   help="torch (default), or for an exported .onnx model onnxruntime (its default) or openvino")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute type of the torch or openvino backend (bfloat16: faster on CPUs with bf16 units; "
                        "openvino: its bf16 inference precision; check the mean IU with fcnseg evaluate)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--tile", type=int, default=1024, help="images larger than this on a side are tiled (default 1024)")
    p.add_argument("--overlap", type=int, default=256, help="pixels shared by neighbouring tiles (default 256)")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test-time augmentation: average over these input scales, e.g. 0.75 1 1.25")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <stem>_uncertainty.png: 8-bit normalised entropy (255 = most uncertain)")
    p.add_argument("--max-side", type=int, default=None, metavar="PX",
                   help="shrink photos whose long side exceeds PX before segmenting (default: the scale the model "
                        "was trained at, from its record; 0: never shrink)")
    p.add_argument("--scale", type=float, default=None, metavar="S",
                   help="resize every photo by S before segmenting (instead of --max-side); the mask is resampled "
                        "back to the photo's size")
    add_progress_argument(p, "on for two or more images")
    p.add_argument("--quiet", dest="progress", action="store_false", help=argparse.SUPPRESS)  # the old spelling
    add_dense_arguments(p)
    add_engine_arguments(p)
    return p


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many machines (Ray Data; docs/scale.md)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: a pool of Ray actors, local or on a cluster, writing "
                        "the same files and OUT/manifest.parquet; INPUT may also be a .txt/.csv/.parquet list of paths")
    g.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="with --engine ray: join the Ray cluster there ('auto': the one on this machine); "
                        "default: a local Ray started and stopped by the command")
    g.add_argument("--num-workers", type=int, default=1, metavar="N", help="with --engine ray: actors (default 1)")
    g.add_argument("--worker-threads", type=int, default=None, metavar="T",
                   help="with --engine ray: torch threads per actor (default: the CPUs shared among the actors)")
    g.add_argument("--resume", action="store_true",
                   help="with --engine ray: continue the job in --out (inputs recorded ok with their files are kept, "
                        "the rest recomputed)")


# -- dense scores by shift-and-stitch or rarefaction (paper section 3.2; shared with evaluate) ---------
DENSE_METHODS = ("shift-and-stitch", "rarefaction")  # as fcnseg.models.dense.DENSE_METHODS, without importing torch


def add_dense_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dense", choices=DENSE_METHODS, default=None,
                   help="score the net densely at --dense-stride instead of upsampling its coarse scores: "
                        "shift-and-stitch ((stride/dense-stride)^2 passes) or rarefaction (one pass of a dilated copy; "
                        "FCN-32s nets only); then fixed bilinear upsampling by --dense-stride")
    p.add_argument("--dense-stride", type=int, default=None, metavar="T",
                   help="output stride of the dense scores, dividing the model's (default 8)")


def check_dense_flags(args: argparse.Namespace) -> None:
    """The --dense flags, checked against each other and the checkpoint's kind before anything is read."""
    from ..errors import FcnsegError

    if args.dense is None and args.dense_stride is not None:
        raise FcnsegError("--dense-stride needs --dense shift-and-stitch or --dense rarefaction")
    if args.dense is not None and str(args.checkpoint).endswith(".onnx"):
        raise FcnsegError("--dense needs a PyTorch checkpoint; an exported .onnx model has its upsampling built in")


def dense_model(args: argparse.Namespace, load):
    """``load()``'s model densified as the flags ask, or ``None`` without ``--dense``; flags that do not
    fit get a one-line error before anything is loaded."""
    check_dense_flags(args)
    if args.dense is None:
        return None
    from ..models.dense import densify

    return densify(load(), args.dense, args.dense_stride or 8)


def expand_inputs(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Files from files, folders and globs (in order, without repeats) and one message per pattern
    that names nothing."""
    files: list[Path] = []
    problems: list[str] = []
    for pat in patterns:
        path = Path(pat)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(f"{pat}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif glob.has_magic(pat):
            found = sorted(Path(p) for p in glob.glob(pat, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{pat}: pattern matches no files")
        else:
            found = [path]  # a missing or unreadable file is reported when it is read
        files += found
    seen: set[Path] = set()
    unique = []
    for f in files:
        try:
            key = f.resolve()
        except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError on a symlink loop
            problems.append(f"{show_path(f)}: cannot be read (a symlink loop)")
            continue
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


def output_stems(files: list[Path]) -> list[str]:
    """Output names: the file stem; a later file whose stem is taken gets its parent folder's name in front
    (and a number if that is taken too). ``renamed_stems`` says which."""
    stems, used = [], set()
    for f in files:
        stem = f.stem if f.stem not in used else f"{f.parent.name}_{f.stem}"
        base, n = stem, 2
        while stem in used:
            stem, n = f"{base}_{n}", n + 1
        used.add(stem)
        stems.append(stem)
    return stems


def renamed_stems(files: list[Path], stems: list[str]) -> list[str]:
    """One line per input whose output name is not its own stem, naming the input that has it."""
    owner: dict[str, Path] = {}
    lines = []
    for f, stem in zip(files, stems):
        owner.setdefault(stem, f)
        if stem != f.stem:
            lines.append(f"{show_path(f.stem)}.png from {show_path(owner[f.stem])}; {show_path(f)} written as "
                         f"{show_path(stem)}.png")
    return lines


def run(args: argparse.Namespace) -> int:
    from ..data.io import read_image
    from ..errors import FcnsegError
    from ..files import output_dir, write_group
    from ..inference.visualize import PredictionFiles
    from ..inference.segmenter import Segmenter
    from ..inference.uncertainty import uncertainty
    from ..weights.checkpoint import check_checkpoint_name, checkpoint_heads, load_checkpoint

    if not args.out.exists() and args.out.suffix.lower() in IMAGE_SUFFIXES:  # not a folder named result.png
        raise FcnsegError(f"--out {show_path(args.out)}: predict writes a folder (OUT/<image>.png per image), and "
                          f"this looks like an image file name; give a folder, e.g. --out {show_path(args.out.with_suffix(''))}")
    out: Path = output_dir(args.out, what="--out")  # before the model loads
    hold_output(args, out)  # one writer per folder, whichever engine writes it
    if args.engine == "ray" or args.resume or args.address or args.num_workers != 1 or args.worker_threads:
        return run_ray(args, out)
    files, problems = expand_inputs(args.inputs)
    if not any(f.is_file() for f in files):  # inputs too are checked before the model loads
        for msg in problems:
            say(msg)
        raise FcnsegError(f"{show_path(files[0])}: no such image file" if files else "no images to segment")
    options = dict(device=args.device, dtype=args.dtype, tile=args.tile, overlap=args.overlap, flip=args.flip,
                   scales=args.scales, max_side="auto" if args.max_side is None else args.max_side, scale=args.scale)
    check_dense_flags(args)  # a flag mistake is named whether or not the file exists
    check_checkpoint_name(args.checkpoint)
    heads = checkpoint_heads(args.checkpoint)
    if heads is not None:
        return run_heads(args, out, files, problems, heads)
    dense = dense_model(args, lambda: load_checkpoint(args.checkpoint, device=args.device))
    seg = Segmenter(dense, inplace=True, **options) if dense is not None else \
        load_segmenter(args.checkpoint, backend=args.backend, **options)

    files_of = PredictionFiles(overlay=args.overlay, alpha=args.alpha, probs=args.probs, uncertainty=args.uncertainty)

    mean_uncertainty: list[float] = []

    def write_one(path: Path, stem: str) -> None:
        image = read_image(path)
        pred = seg.segment(image, probs=files_of.needs_probs)
        u = uncertainty(pred.probs) if args.uncertainty else None  # once: for the file and for the warning
        write_group(files_of.group(out, stem, image, pred, seg.colors, uncertainty=u), overwrite=args.overwrite)
        if u is not None:
            mean_uncertainty.append(float(u.mean()))

    legends = {"legend.png": (seg.classes, seg.colors)}
    code = write_each(args, out, files, problems, files_of.names, write_one, legends)
    if args.uncertainty and (warning := uniform_uncertainty(mean_uncertainty)):
        say(f"warning: {warning}")
    return code


def uniform_uncertainty(means: list[float], floor: float = 0.9) -> str | None:
    """A warning when every image's mean uncertainty (0..1) is at least ``floor``: the model prefers no class
    anywhere (barely trained), so its uncertainty maps and rankings say nothing about the images yet."""
    if not means or min(means) < floor:
        return None
    span = f"{min(means):.3f}" if len(means) == 1 else f"{min(means):.3f} to {max(means):.3f}"
    return (f"the model is near-uniformly uncertain (mean uncertainty {span} of 1 on every image): it is barely "
            f"trained, so the uncertainty (and a ranking by it) means little yet; train it further first")


def run_ray(args: argparse.Namespace, out: Path) -> int:
    """``predict --engine ray``: the same checks and lines as predict, the work done by ``fcnseg.inference.ray_predict``."""
    from ..errors import FcnsegError
    from ..inference.visualize import PredictionFiles
    from ..inference.ray_predict import RayJob, expand_manifests, import_ray, quiet_ray, run_job, summary
    from ..weights.checkpoint import (check_checkpoint_name, check_weights_fit, checkpoint_heads, read_record,
                                      resolve_checkpoint)

    if args.engine != "ray":
        raise FcnsegError("--resume, --address, --num-workers and --worker-threads go with --engine ray")
    if args.num_workers < 1 or (args.worker_threads is not None and args.worker_threads < 1):
        raise FcnsegError("--num-workers and --worker-threads must be at least 1")
    if args.dense is not None:
        raise FcnsegError("--engine ray does not take --dense; run it without --engine ray")
    import_ray()  # a missing Ray is said before anything else
    files, problems = expand_inputs(expand_manifests(args.inputs))
    if not any(f.is_file() for f in files):
        for msg in problems:
            say(msg)
        raise FcnsegError(f"{show_path(files[0])}: no such image file" if files else "no images to segment")
    check_checkpoint_name(args.checkpoint)
    if checkpoint_heads(args.checkpoint) is not None:
        raise FcnsegError(f"{show_path(args.checkpoint)} is a multi-head net; --engine ray writes single-head masks")
    if not str(args.checkpoint).endswith(".onnx"):  # checked here once, not in every actor
        path = resolve_checkpoint(args.checkpoint)
        check_weights_fit(path, read_record(path))
    options = dict(device=args.device, dtype=args.dtype, tile=args.tile, overlap=args.overlap, flip=args.flip,
                   scales=args.scales, max_side="auto" if args.max_side is None else args.max_side, scale=args.scale)
    job = RayJob(checkpoint=args.checkpoint, out=out, backend=args.backend, segmenter_options=options,
                 files=PredictionFiles(overlay=args.overlay, alpha=args.alpha, probs=args.probs,
                                       uncertainty=args.uncertainty),
                 overwrite=args.overwrite, resume=args.resume, address=args.address, num_workers=args.num_workers,
                 worker_threads=args.worker_threads)
    for msg in problems:
        say(msg)
    stems = output_stems(files)
    for line in renamed_stems(files, stems):
        say(line)
    quiet_ray()  # the program's choice: Ray's INFO lines stay out of the command's output
    outcome = run_job(job, list(zip(files, stems)), say, progress=args.progress is not False and len(files) > 1)
    print(summary(outcome, out) + (f"; {len(problems)} input pattern(s) named nothing" if problems else ""))
    return 1 if outcome.failed or outcome.skipped or problems else 0


def run_heads(args: argparse.Namespace, out: Path, files: list[Path], problems: list[str],
              heads: dict[str, dict]) -> int:
    """``predict`` for a multi-head checkpoint: ``OUT/<stem>_<head>.png`` for every head of every input, one
    image's files written all-or-nothing (``write_head_masks`` through ``write_group``), and ``legend_<head>.png``.
    The net runs on the whole image in float32: the single-head options below are refused, not ignored."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from ..weights.checkpoint import load_checkpoint
    from ..data.io import read_image
    from ..errors import FcnsegError
    from ..inference.visualize import write_head_masks

    unsupported = [flag for flag, used in (
        ("--overlay", args.overlay), ("--probs", args.probs), ("--uncertainty", args.uncertainty),
        ("--flip", args.flip), ("--scales", list(args.scales) != [1.0]), ("--dense", args.dense is not None),
        (f"--backend {args.backend}", args.backend not in (None, "torch")), ("--dtype bfloat16", args.dtype != "float32"),
        ("--scale", args.scale is not None), ("--max-side", bool(args.max_side))) if used]
    if unsupported:
        raise FcnsegError(f"{show_path(args.checkpoint)} is a multi-head net ({', '.join(heads)}); predict writes "
                          f"one mask per head only, without {', '.join(unsupported)}")
    model = load_checkpoint(args.checkpoint, device=args.device)
    record = model.record
    colors = {name: h["colors"] for name, h in heads.items()}

    def write_one(path: Path, stem: str) -> None:
        x = TF.to_dtype(TF.pil_to_tensor(read_image(path)), torch.float32, scale=True)[None]  # (1, 3, H, W)
        with torch.no_grad():
            logits = model(record.normalize(x).to(args.device))  # {head: (1, K, H, W)}
        write_head_masks(logits, colors, out, stem, overwrite=args.overwrite)

    legends = {f"legend_{name}.png": (head["classes"], head["colors"]) for name, head in heads.items()}
    return write_each(args, out, files, problems, lambda stem: [f"{stem}_{h}.png" for h in heads], write_one,
                      legends, what=f" ({len(heads)} masks each: {', '.join(heads)})")


def write_each(args: argparse.Namespace, out: Path, files: list[Path], problems: list[str],
               names_of: Callable[[str], list[str]], write_one: Callable[[Path, str], None],
               legends: dict[str, tuple[list[str], list[list[int]]]], what: str = "") -> int:
    """The writing loop both kinds of net share: each input's files (``names_of(stem)``) are skipped with a line
    when one exists (unless --overwrite), else ``write_one`` writes them all-or-nothing; a full disk or an
    unwritable folder stops the run; the legends follow once something was written; one summary line."""
    from tqdm import tqdm

    from ..files import atomic_write, clean_stale_temps
    from ..errors import FcnsegError, OutputExistsError, OutputWriteError
    from ..inference.visualize import legend

    clean_stale_temps(out)
    for msg in problems:
        say(msg)
    stems = output_stems(files)
    for line in renamed_stems(files, stems):
        say(line)
    written = skipped = failed = stopped = 0
    todo = list(zip(files, stems))
    bar = tqdm(todo, unit="image", disable=args.progress is False or len(files) < 2, file=sys.stderr)
    for i, (path, stem) in enumerate(bar):
        there = [n for n in names_of(stem) if (out / n).exists()] if not args.overwrite else []
        if there:  # checked before the work; the exclusive write still catches a name taken meanwhile
            skipped += 1
            say(f"{show_path(out / there[0])}: exists already, not replaced (--overwrite replaces it)")
            continue
        try:
            write_one(path, stem)
            written += 1
        except OutputExistsError as e:
            skipped += 1
            say(f"{e} (another run wrote it meanwhile; --overwrite replaces it)")
        except OutputWriteError as e:  # a full disk or a read-only folder fails every later image too
            failed += 1
            stopped = len(todo) - i - 1
            say(str(e))
            break
        except (FcnsegError, OSError, ValueError, RuntimeError) as e:
            failed += 1
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            say(msg if str(path) in msg else f"{show_path(path)}: {msg}")
    bar.close()
    if written:
        for name, (classes, colors) in legends.items():
            try:
                atomic_write(out / name, lambda tmp, c=classes, k=colors: legend(c, k).save(tmp, format="PNG"))
            except OutputWriteError as e:
                failed += 1
                say(str(e))
    parts = [f"wrote {written} prediction(s){what} to {show_path(out)}"]
    if skipped:
        parts.append(f"{skipped} skipped because they exist (--overwrite replaces them)")
    if failed or problems:
        parts.append(f"{failed + len(problems)} failed")
    if stopped:
        parts.append(f"stopped with {stopped} image(s) not attempted")
    print("; ".join(parts))
    return 1 if failed or problems or skipped else 0


def say(message: str) -> None:
    """One ``fcnseg:`` line on stderr, control characters escaped, never inside an open progress bar."""
    from . import stderr_line

    stderr_line(f"fcnseg: {printable(message)}")


def load_segmenter(checkpoint: str, backend: str | None = None, **kwargs):
    """A Segmenter for the CLI, after ``check_checkpoint_name``. A process-wide step the library leaves to
    programs: a 16-bit conversion's freed float32 weights go back to the OS (glibc keeps freed pages)."""
    from ..inference.segmenter import Segmenter
    from ..weights.checkpoint import check_checkpoint_name
    from ..hardware import return_freed_memory

    check_checkpoint_name(checkpoint)
    seg = Segmenter.from_checkpoint(checkpoint, backend=backend, **kwargs)
    if kwargs.get("dtype") not in (None, "float32"):
        return_freed_memory()
    return seg
