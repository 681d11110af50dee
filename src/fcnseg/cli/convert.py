"""``fcnseg convert``: import the paper's VGG16 FCNs from the torchfcn port or the official Caffe models."""
from __future__ import annotations

import argparse
import shlex


def add_parser(sub) -> argparse.ArgumentParser:
    from ..weights.convert import ARCHS, SOURCES

    p = sub.add_parser(
        "convert", help="import FCN weights from torchfcn (.pth) or Caffe (.caffemodel) into an fcnseg checkpoint",
        description="Import the paper's VGG16 FCNs: state dicts of the torchfcn PyTorch port (its FCN32s/16s/8s/"
                    "8sAtOnce, including its ports of the official models) or the official .caffemodel files. "
                    "The checkpoint takes RGB input; conv1_1 is reordered from the sources' BGR, and the record's "
                    "normalization reproduces their 0-255 mean-subtracted input.")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="where the weights come from")
    p.add_argument("--arch", choices=ARCHS, help="architecture (default: inferred from the layer names)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from score_fr's shape)")
    p.add_argument("--classes-file", help="class names, one per line (default: PASCAL VOC's for 21 classes, "
                                          "else class_0, class_1, ...)")
    p.add_argument("input", metavar="IN", help="a torchfcn .pth state dict or a .caffemodel")
    p.add_argument("output", metavar="OUT", help="checkpoint to write (.safetensors, with a .json record beside it)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..weights.convert import convert_file, read_classes

    classes = read_classes(args.classes_file) if args.classes_file else None
    command = ["fcnseg", "convert", "--from", args.source]
    for flag, value in (("--arch", args.arch), ("--num-classes", args.num_classes),
                        ("--classes-file", args.classes_file)):
        if value is not None:
            command += [flag, str(value)]
    command += [args.input, args.output]
    path, record = convert_file(args.input, args.output, args.source, arch=args.arch,
                                num_classes=args.num_classes, classes=classes, command=shlex.join(command))
    print(f"wrote {path} ({record['arch']}, {record['num_classes']} classes) from {args.source} weights {args.input}")
    if "classes" in record["provenance"]:
        print(f"classes {record['provenance']['classes']}")
    unused = record["provenance"].get("unused_layers")
    if unused:
        print(f"layers not used: {', '.join(unused)}")
    return 0
