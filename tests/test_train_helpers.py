"""Shared by the training tests: a tiny registered FCN (no batch norm, no dropout) and a tiny folder dataset.

Subprocess tests (resume, distributed) run ``fcnseg`` through a launcher script that registers the tiny
model first, since a test-only model is not part of the package.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TINY_SOURCE = '''
import torch
import torch.nn as nn

from fcnseg import list_models, register_model
from fcnseg.models import FCN, Backbone


class TinyBackbone(Backbone):
    """Five stride-2 3x3 convolutions (8, 8, 8 | 12 | 16 channels): strides 8, 16, 32 in a few thousand weights."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU())

        self.s8 = nn.Sequential(block(3, 8), block(8, 8), block(8, 8))
        self.s16 = block(8, 12)
        self.s32 = block(12, 16)
        self._declare([(8, [self.s8], 8), (16, [self.s16], 12), (32, [self.s32], 16)])

    def forward(self, x):
        c8 = self.s8(x)  # 1/8
        c16 = self.s16(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.s32(c16)}  # 1/32


class NaNFCN(FCN):
    """Always predicts NaN: drives the non-finite-loss path."""

    def forward(self, x):
        return super().forward(x) * float("nan")


def _tiny(num_classes=3, skips=(16, 8), cls=FCN, **kw):
    net = cls(TinyBackbone(), num_classes, skips=skips, fc_channels=0, **kw)
    for conv in [net.score_fr, *net.score_skip.values()]:  # not zero: every layer learns from the first step
        nn.init.normal_(conv.weight, std=0.1)
    return net


if "tiny_fcn8s" not in list_models():
    register_model("tiny_fcn8s")(lambda num_classes=3, **kw: _tiny(num_classes, (16, 8), **kw))
    register_model("tiny_fcn16s")(lambda num_classes=3, **kw: _tiny(num_classes, (16,), **kw))
    register_model("tiny_fcn32s")(lambda num_classes=3, **kw: _tiny(num_classes, (), **kw))
    register_model("tiny_nan")(lambda num_classes=3, **kw: _tiny(num_classes, (16, 8), cls=NaNFCN, **kw))
'''

LAUNCHER = '''
import sys
sys.path.insert(0, {folder!r})
import tiny_models  # noqa: F401  (registers tiny_fcn8s, tiny_nan, ...)
from fcnseg.cli import main
sys.exit(main())
'''


TINY_NAMES = ("tiny_fcn8s", "tiny_fcn16s", "tiny_fcn32s", "tiny_nan")


def register_tiny() -> None:
    """Register the tiny models in this process (idempotent)."""
    exec(compile(TINY_SOURCE, "tiny_models", "exec"), {})


def unregister_tiny() -> None:
    """Take them out again, so registry-wide tests elsewhere never see test-only models."""
    from fcnseg import registry

    for name in TINY_NAMES:
        if name in registry.list_models():
            registry.unregister_model(name)


def write_launcher(folder: Path) -> Path:
    """``folder/launch.py``: ``python launch.py train ...`` is ``fcnseg train ...`` with the tiny models."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_models.py").write_text(TINY_SOURCE)
    path = folder / "launch.py"
    path.write_text(LAUNCHER.format(folder=str(folder)))
    return path


def make_folder_dataset(root: Path, n_train: int = 8, n_val: int = 2, size=(32, 40), seed: int = 0) -> Path:
    """A ``folder`` dataset of bright squares (class 1) and blue discs (class 2) on noise, a void top row."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\nsquare\ndisc\n")
    h, w = size
    names = []
    for i in range(n_train + n_val):
        img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(2, h - 12), rng.integers(2, w - 12)
        mask[y:y + 10, x:x + 10] = 1
        img[y:y + 10, x:x + 10, 0] = 220
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - rng.integers(5, h - 5)) ** 2 + (xx - rng.integers(5, w - 5)) ** 2 < 20
        mask[disc] = 2
        img[disc, 2] = 200
        mask[0, :] = 255  # ignored
        name = f"img{i:03d}"
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
        names.append(name)
    (root / "splits" / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(names[n_train:]) + "\n")
    return root


def env() -> dict[str, str]:
    """The environment for child processes: one thread each (the machine is shared)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e


def run_cli(launcher: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(launcher), *args], env=env(), capture_output=True, text=True,
                          timeout=timeout)


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "2",
            "--batch-size", "2", "--lr", "0.01", "--optimizer", "adam", "--crop-size", "32", "32", "--workers", "0",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]


def read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
