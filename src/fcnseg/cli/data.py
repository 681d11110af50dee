"""``fcnseg data``: ``check`` a dataset, ``import`` a labelling tool's export, ``rank`` images by uncertainty,
``download`` a public dataset."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.download import DEFAULT_LIMITS
from ..errors import printable, show_path
from . import add_progress_argument, hold_output

# data rank: images larger than this are refused before they are read (a full-size probability map of K
# classes costs 4 K bytes a pixel: 20 Mpx of 33 classes is 2.6 GB)
RANK_MAX_PIXELS = 20_000_000


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="check, import (labelme, COCO, CVAT), rank by uncertainty, download datasets",
                       description="Work on datasets: check a split, import a labelling tool's export as a folder "
                                   "dataset, rank unlabelled images by the model's uncertainty, download a public "
                                   "dataset. 'fcnseg data SUBCOMMAND --help' says more.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _add_check_and_import(dsub)
    _add_rank_and_download(dsub)
    return p


def _add_check_and_import(dsub) -> None:
    c = dsub.add_parser("check", help="read every image/mask pair, print one line per problem, then class weights",
                        description="Read every image/mask pair of a split and print one line per problem (unreadable "
                                    "or truncated files, sizes that differ, labels out of range), then the pixel count "
                                    "and frequency of each class and median-frequency class weights. Exit 1 when "
                                    "there are problems.")
    c.add_argument("--dataset", required=True, help="dataset family (camvid, camvid32, siftflow, voc, nyudv2, folder)")
    c.add_argument("--root", required=True, type=Path, help="dataset root directory")
    c.add_argument("--split", required=True, help="split to scan, e.g. train, val, trainval")
    c.add_argument("--weights-json", type=Path, default=None, metavar="PATH",
                   help="also write class statistics and median-frequency weights to PATH (for train --class-weights)")
    c.add_argument("--no-weights-json", action="store_true", help=argparse.SUPPRESS)  # old scripts: now the default
    c.add_argument("--ignore-value", type=int, default=None, metavar="V",
                   help="folder datasets: mask value V means 'not labelled' (e.g. 11 for CamVid-style void)")
    add_progress_argument(c)
    c.set_defaults(_data=run_check)

    i = dsub.add_parser("import", help="turn a labelme, COCO or CVAT export into a folder dataset",
                        description="Convert polygon/box/RLE annotations into OUT/images, OUT/masks (palette PNGs of "
                                    "class ids), OUT/classes.txt (name R G B; line 0 is the background) and "
                                    "OUT/splits/{train,val,all}.txt. Shapes that cannot be converted are listed, one "
                                    "line each. Later shapes are drawn over earlier ones (CVAT: by z_order). "
                                    "Labels named void/ignore become ignored pixels (255). Images are read only "
                                    "from inside the export's folders. docs/own-data.md lists every check.")
    i.add_argument("src", type=Path, metavar="SRC",
                   help="labelme: a .json file or a folder of them; coco: the instances .json; cvat: annotations.xml")
    i.add_argument("--from", dest="fmt", required=True, choices=("labelme", "coco", "cvat"), help="the tool's format")
    i.add_argument("--out", required=True, type=Path, help="new (or empty) folder for the dataset")
    i.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="where the export's images are (default: beside SRC, or its images/ folder)")
    i.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class order after the background (default: the labels sorted); other labels are left out")
    i.add_argument("--background", default="background", help="name of class 0, for unlabelled pixels")
    i.add_argument("--unlabelled", choices=("background", "ignore"), default="background",
                   help="what pixels outside every shape are (default background; ignore: left out of training)")
    i.add_argument("--val-fraction", type=float, default=0.1, help="share of images listed in splits/val.txt")
    i.add_argument("--seed", type=int, default=0, help="seed of the train/val partition")
    i.add_argument("--allow-outside", action="store_true",
                   help="follow image names that lead outside the export's folders (absolute, '..', links)")
    i.set_defaults(_data=run_import)


def _add_rank_and_download(dsub) -> None:
    r = dsub.add_parser("rank", help="rank unlabelled images by the model's mean uncertainty (label the top ones next)",
                        description="Segment each image, average the per-pixel uncertainty (normalised entropy or "
                                    "margin; 1 = no preference between classes) and write the images as CSV, most "
                                    "uncertain first: the ones to label next. A barely trained model is uncertain "
                                    "everywhere, and then the ranking means little (a warning says so).")
    r.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    r.add_argument("--checkpoint", required=True, help="built-in name, .safetensors checkpoint or run directory")
    r.add_argument("--out", required=True, type=Path, metavar="CSV", help="ranking as CSV, most uncertain first")
    r.add_argument("--measure", choices=("entropy", "margin"), default="entropy",
                   help="normalised entropy or 1 - (p1 - p2) (default entropy)")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    r.add_argument("--max-pixels", type=int, default=RANK_MAX_PIXELS, metavar="N",
                   help=f"refuse images of more than N pixels before reading them (default {RANK_MAX_PIXELS:,}); "
                        f"the full-size class probabilities take 4 bytes per pixel and class")
    add_progress_argument(r, "on")
    r.set_defaults(_data=run_rank)

    d = dsub.add_parser("download", help="download, verify and extract a public dataset (resumable)",
                        description="Download a public dataset into --root, resuming a cut-off download, check each "
                                    "archive's checksum and extract it within the limits below.")
    d.add_argument("name", help="what to fetch: voc2012, voc2011, sbd, voc (= voc2012 + sbd), camvid, siftflow")
    d.add_argument("--root", required=True, type=Path, help="directory to put the dataset in")
    add_progress_argument(d, "on")
    limits = d.add_argument_group("extraction limits", "An archive that would unpack to more is refused before "
                                  "anything is written (the defaults are about 4x the largest supported dataset).")
    limits.add_argument("--max-extract-gb", type=float, default=DEFAULT_LIMITS.max_bytes / 2**30, metavar="GB",
                        help="total size of the extracted files (default %(default)g GiB)")
    limits.add_argument("--max-ratio", type=float, default=DEFAULT_LIMITS.max_ratio, metavar="R",
                        help="extracted size / archive size (default %(default)g; zip bombs are 1000 and more)")
    limits.add_argument("--max-members", type=int, default=DEFAULT_LIMITS.max_members, metavar="N",
                        help="files and folders in one archive (default %(default)d)")
    d.set_defaults(_data=run_download)


def run(args: argparse.Namespace) -> int:
    return args._data(args)


def run_check(args: argparse.Namespace) -> int:
    from ..data import build_dataset
    from ..data.checks import check_dataset, write_weights_json
    from ..files import output_file

    if args.ignore_value is not None and args.dataset != "folder":
        from ..errors import FcnsegError

        raise FcnsegError(f"--ignore-value is for folder datasets; {args.dataset} maps its own void label")
    kwargs = {} if args.ignore_value is None else {"ignore_value": args.ignore_value}
    # checked before the scan, which can take minutes; nothing is written unless asked
    json_path = output_file(args.weights_json, what="--weights-json") if args.weights_json is not None else None
    dataset = build_dataset(args.dataset, args.root, args.split, skip_bad=True, transforms=_identity, **kwargs)
    source = getattr(dataset, "split_source", None)
    print(f"scanning split {dataset.split!r} of {args.dataset}" + (f" ({source})" if source else ""))
    progress = None
    if args.progress or (args.progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        progress = lambda it: tqdm(it, desc=f"checking {args.dataset} {args.split}", unit="pair", leave=False)  # noqa: E731
    report = check_dataset(dataset, progress=progress, on_problem=lambda m: print(m, flush=True))

    kinds = ", ".join(f"{n} {k}" for k, n in report.counts_by_kind().items())
    print(f"checked {report.samples} pairs of {args.dataset} {args.split}: {report.good} good, "
          f"{len(report.problems)} problems" + (f" ({kinds})" if kinds else ""))
    total = int(report.class_pixels.sum()) + report.ignored_pixels
    print(f"pixels: {total:,} ({report.ignored_pixels / max(total, 1):.2%} ignored)")
    weights = report.class_weights()
    width = max(len(c) for c in report.classes)
    print(f"{'id':>3} {'class':<{width}} {'pixels':>13} {'frequency':>9} {'weight':>8}")
    for i, (name, px, f, w) in enumerate(zip(report.classes, report.class_pixels, report.frequencies(), weights)):
        print(f"{i:>3} {name:<{width}} {int(px):>13,} {f:>9.4f} {w:>8.4f}")
    print("class weights (median frequency): " + ", ".join(f"{w:.4f}" for w in weights))
    if json_path is not None:
        if not report.good or not any(weights):
            print(f"fcnseg: no class weights written to {show_path(json_path)}: no readable labelled pixels",
                  file=sys.stderr)
            return 1
        write_weights_json(report, json_path, dataset=args.dataset, root=str(args.root), split=args.split)
        print(f"wrote {show_path(json_path)}")
    return 0 if report.ok else 1


def _identity(image, mask):
    return image, mask


def run_import(args: argparse.Namespace) -> int:
    from ..data.importers import import_annotations

    hold_output(args, args.out)  # one import per folder: a second is refused, not mixed in
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    report = import_annotations(args.fmt, args.src, args.out, images=args.images, background=args.background,
                                unlabelled=args.unlabelled, classes=classes, val_fraction=args.val_fraction,
                                seed=args.seed, allow_outside=args.allow_outside)
    for msg in report.problems:
        print(f"fcnseg: {printable(msg)}", file=sys.stderr)
    if report.ignored:
        print("drawn as ignored pixels (mask value 255), not as a class: "
              + ", ".join(f"{n} shapes labelled {label!r}" for label, n in report.ignored.items()))
    print(printable(f"imported {report.images} images, {report.shapes} shapes, {len(report.classes)} classes "
                    f"({', '.join(report.classes)}) into {report.out}; splits: {report.train} train, {report.val} val"
                    + (f"; {len(report.problems)} left out (listed above)" if report.problems else "")))
    return 1 if report.problems else 0


def run_rank(args: argparse.Namespace) -> int:
    from ..errors import FcnsegError
    from ..files import output_file
    from ..inference.uncertainty import rank_images
    from .predict import expand_inputs, load_segmenter, say, uniform_uncertainty

    output_file(args.out, what="--out", overwrite=False)  # before the images are read and the model loads
    files, problems = expand_inputs([str(i) for i in args.inputs])
    files = [f for f in files if not too_many_pixels(f, args.max_pixels, problems)]
    for msg in problems:
        print(f"fcnseg: {msg}", file=sys.stderr)
    if not files:
        raise FcnsegError("no images to rank")
    seg = load_segmenter(args.checkpoint, device=args.device)
    rows, failed = rank_images(seg, files, args.out, measure=args.measure, progress=args.progress is not False,
                               on_problem=say)  # said while rank's progress bar is drawn: predict's own line
    print(f"ranked {len(rows)} images by mean {args.measure} uncertainty into {show_path(args.out)}"
          + (f"; {failed} failed" if failed else ""))
    for row in rows[:5]:
        print(f"  {row['mean_uncertainty']:.4f}  {row['image']}")
    if warning := uniform_uncertainty([r["mean_uncertainty"] for r in rows]):
        print(f"fcnseg: warning: {warning}", file=sys.stderr)
    return 1 if failed or problems else 0


def too_many_pixels(path: Path, limit: int, problems: list[str]) -> bool:
    """Whether the image's header says more than ``limit`` pixels (then a line is added to ``problems``);
    a file that cannot be opened is left to be reported when it is read."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels = im.width * im.height
    except Exception:  # Pillow's own errors, a bomb over its hard limit: reported by the reader
        return False
    if pixels <= limit:
        return False
    problems.append(f"{show_path(path)}: {pixels:,} pixels, more than --max-pixels {limit:,}; shrink it first or "
                    f"raise --max-pixels")
    return True


def run_download(args: argparse.Namespace) -> int:
    from ..data.download import ExtractLimits, download_dataset
    from ..errors import FcnsegError

    for flag, value in (("--max-extract-gb", args.max_extract_gb), ("--max-ratio", args.max_ratio),
                        ("--max-members", args.max_members)):
        if not value > 0:
            raise FcnsegError(f"{flag} must be positive, got {value}")
    limits = ExtractLimits(max_bytes=int(args.max_extract_gb * 2**30), max_ratio=args.max_ratio,
                           max_members=args.max_members)
    path = download_dataset(args.name, args.root, progress=args.progress is not False, limits=limits)
    print(f"{args.name} ready in {path}")
    return 0
