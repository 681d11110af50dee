"""``fcnseg predict``: segment image files, folders and globs into palette PNGs (and overlays, probabilities)."""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="segment images: palette PNG of class ids per image, optional overlay and probabilities",
                       description="Segment images. For each INPUT writes OUT/<stem>.png (palette PNG of class ids at "
                                   "the input's size), and OUT/legend.png once.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (their images) or glob patterns")
    p.add_argument("--checkpoint", default="camvid",
                   help="built-in name, .safetensors checkpoint, run directory, or .onnx file (default: camvid)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg: colours blended over the image")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight (default 0.5)")
    p.add_argument("--probs", action="store_true", help="also write <stem>_probs.npy: float16 (K, H, W) probabilities")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default=None,
                   help="torch (default) or onnxruntime for an exported .onnx model (default for .onnx files)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute type of the torch backend (bfloat16: faster on CPUs with bf16 units)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--tile", type=int, default=1024, help="images larger than this on a side are tiled (default 1024)")
    p.add_argument("--overlap", type=int, default=256, help="pixels shared by neighbouring tiles (default 256)")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test-time augmentation: average over these input scales, e.g. 0.75 1 1.25")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dense_arguments(p)
    return p


# -- dense scores by shift-and-stitch or rarefaction (paper section 3.2; shared with evaluate) ---------
DENSE_METHODS = ("shift-and-stitch", "rarefaction")  # as fcnseg.models.dense.DENSE_METHODS, without importing torch


def add_dense_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dense", choices=DENSE_METHODS, default=None,
                   help="score the net densely at --dense-stride instead of upsampling its coarse scores: "
                        "shift-and-stitch ((stride/dense-stride)^2 passes) or rarefaction (one pass of a dilated copy; "
                        "FCN-32s nets only); then fixed bilinear upsampling by --dense-stride")
    p.add_argument("--dense-stride", type=int, default=None, metavar="T",
                   help="output stride of the dense scores, dividing the model's (default 8)")


def dense_model(args: argparse.Namespace, load):
    """``load()``'s model densified as the flags ask, or ``None`` without ``--dense``; flags that do not
    fit get a one-line error before anything is loaded."""
    from ..errors import FcnsegError

    if args.dense is None:
        if args.dense_stride is not None:
            raise FcnsegError("--dense-stride needs --dense shift-and-stitch or --dense rarefaction")
        return None
    if str(args.checkpoint).endswith(".onnx"):
        raise FcnsegError("--dense needs a PyTorch checkpoint; an exported .onnx model has its upsampling built in")
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
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


def output_stems(files: list[Path]) -> list[str]:
    """Output names: the file stem, made unique with the parent folder's name where stems repeat."""
    counts: dict[str, int] = {}
    for f in files:
        counts[f.stem] = counts.get(f.stem, 0) + 1
    stems, used = [], set()
    for f in files:
        stem = f.stem if counts[f.stem] == 1 else f"{f.parent.name}_{f.stem}"
        base, n = stem, 2
        while stem in used:
            stem, n = f"{base}_{n}", n + 1
        used.add(stem)
        stems.append(stem)
    return stems


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ..checkpoint import atomic_write, load_checkpoint
    from ..data.io import read_image
    from ..errors import FcnsegError
    from ..inference import Segmenter
    from ..visualize import legend, overlay, palette_image

    files, problems = expand_inputs(args.inputs)
    options = dict(device=args.device, dtype=args.dtype, tile=args.tile, overlap=args.overlap, flip=args.flip,
                   scales=args.scales)
    check_checkpoint_name(args.checkpoint)
    dense = dense_model(args, lambda: load_checkpoint(args.checkpoint, device=args.device))
    seg = Segmenter(dense, **options) if dense is not None else load_segmenter(args.checkpoint, backend=args.backend,
                                                                               **options)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "legend.png", lambda tmp: legend(seg.classes, seg.colors).save(tmp, format="PNG"))
    for msg in problems:
        print(f"fcnseg: {msg}", file=sys.stderr)

    failed = len(problems)
    bar = tqdm(list(zip(files, output_stems(files))), unit="image", disable=args.quiet or len(files) < 2,
               file=sys.stderr)
    for path, stem in bar:
        try:
            image = read_image(path)
            pred = seg.segment(image, probs=args.probs)
            mask = pred.mask.numpy()
            atomic_write(out / f"{stem}.png", lambda tmp: palette_image(mask, seg.colors).save(tmp, format="PNG"))
            if args.overlay:
                pic = overlay(image, mask, seg.colors, args.alpha)
                atomic_write(out / f"{stem}_overlay.jpg", lambda tmp: pic.save(tmp, format="JPEG", quality=90))
            if pred.probs is not None:
                probs = pred.probs.numpy()

                def save_npy(tmp: str) -> None:
                    with open(tmp, "wb") as f:
                        np.save(f, probs)

                atomic_write(out / f"{stem}_probs.npy", save_npy)
        except (FcnsegError, OSError, ValueError, RuntimeError) as e:
            failed += 1
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            tqdm.write(f"fcnseg: {path}: {msg}" if str(path) not in msg else f"fcnseg: {msg}", file=sys.stderr)
    done = len(files) - (failed - len(problems))
    print(f"wrote {done} prediction(s) to {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def check_checkpoint_name(checkpoint: str) -> None:
    """A name that is neither a path nor an installed built-in gets a one-line hint, not a path error."""
    from ..checkpoint import builtin_checkpoints
    from ..errors import FcnsegError

    looks_like_name = not any(c in checkpoint for c in "/\\.") and not Path(checkpoint).exists()
    if looks_like_name and checkpoint not in builtin_checkpoints():
        installed = ", ".join(builtin_checkpoints()) or "none installed"
        raise FcnsegError(f"built-in checkpoint {checkpoint!r} is not installed (built-in: {installed}); "
                          f"pass --checkpoint PATH to a .safetensors checkpoint, run directory or .onnx file")


def load_segmenter(checkpoint: str, backend: str | None = None, **kwargs):
    """A Segmenter for the CLI, after ``check_checkpoint_name``."""
    from ..inference import Segmenter

    check_checkpoint_name(checkpoint)
    return Segmenter.from_checkpoint(checkpoint, backend=backend, **kwargs)
