"""``fcnseg data``: ``check`` a dataset's files and class statistics, ``download`` a public dataset."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.download import DEFAULT_LIMITS
from ..errors import show_path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="check datasets (bad files, class weights) and download public ones")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    c = dsub.add_parser("check", help="read every image/mask pair, print one line per problem, then class weights")
    c.add_argument("--dataset", required=True, help="dataset family (camvid, camvid32, siftflow, voc, nyudv2, folder)")
    c.add_argument("--root", required=True, type=Path, help="dataset root directory")
    c.add_argument("--split", required=True, help="split to scan, e.g. train, val, trainval")
    c.add_argument("--weights-json", type=Path, default=None,
                   help="where to write class statistics and weights (default: ./DATASET_SPLIT_class_weights.json)")
    c.add_argument("--no-weights-json", action="store_true", help="print only, write no JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(_data=run_check)

    d = dsub.add_parser("download", help="download, verify and extract a public dataset (resumable)")
    d.add_argument("name", help="what to fetch: voc2012, voc2011, sbd, voc (= voc2012 + sbd), camvid, siftflow")
    d.add_argument("--root", required=True, type=Path, help="directory to put the dataset in")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    limits = d.add_argument_group("extraction limits", "An archive that would unpack to more is refused before "
                                  "anything is written (the defaults are about 4x the largest supported dataset).")
    limits.add_argument("--max-extract-gb", type=float, default=DEFAULT_LIMITS.max_bytes / 2**30, metavar="GB",
                        help="total size of the extracted files (default %(default)g GiB)")
    limits.add_argument("--max-ratio", type=float, default=DEFAULT_LIMITS.max_ratio, metavar="R",
                        help="extracted size / archive size (default %(default)g; zip bombs are 1000 and more)")
    limits.add_argument("--max-members", type=int, default=DEFAULT_LIMITS.max_members, metavar="N",
                        help="files and folders in one archive (default %(default)d)")
    d.set_defaults(_data=run_download)
    return p


def run(args: argparse.Namespace) -> int:
    return args._data(args)


def run_check(args: argparse.Namespace) -> int:
    from ..data import build_dataset
    from ..data.checks import check_dataset, write_weights_json
    from ..outputs import output_file

    json_path = None
    if not args.no_weights_json:  # checked before the scan, which can take minutes
        json_path = output_file(args.weights_json or Path(f"{args.dataset}_{args.split}_class_weights.json"),
                                what="--weights-json")
    dataset = build_dataset(args.dataset, args.root, args.split, skip_bad=True, transforms=_identity)
    progress = None
    if not args.no_progress and sys.stderr.isatty():
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
        write_weights_json(report, json_path, dataset=args.dataset, root=str(args.root), split=args.split)
        print(f"wrote {show_path(json_path)}")
    return 0 if report.ok else 1


def _identity(image, mask):
    return image, mask


def run_download(args: argparse.Namespace) -> int:
    from ..data.download import ExtractLimits, download_dataset
    from ..errors import FcnsegError

    for flag, value in (("--max-extract-gb", args.max_extract_gb), ("--max-ratio", args.max_ratio),
                        ("--max-members", args.max_members)):
        if not value > 0:
            raise FcnsegError(f"{flag} must be positive, got {value}")
    limits = ExtractLimits(max_bytes=int(args.max_extract_gb * 2**30), max_ratio=args.max_ratio,
                           max_members=args.max_members)
    path = download_dataset(args.name, args.root, progress=not args.no_progress, limits=limits)
    print(f"{args.name} ready in {path}")
    return 0
