"""The tiny models, checkpoints, images and folder datasets that the tests share, and the launcher that
makes the tiny models visible to ``fcnseg`` in a child process.

conftest.py registers every model of ``TINY_BUILDERS`` for the whole session (after collection, so the
registry contract in test_models.py covers only the package's own models); a test that needs a model of
its own for a while uses ``temporarily_registered``.
"""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import fcnseg
from fcnseg.weights.checkpoint import make_record, save_checkpoint
from fcnseg.models import FCN, Backbone
from fcnseg.registry import temporarily_registered


REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """A script of the repository (``benchmarks/...``, ``scripts/...``) imported as a module, so tests call its
    functions; its ``main`` does not run."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- models ----------------------------------------------------------------------------------------------

class StridedTinyBackbone(Backbone):
    """Five stride-2 3x3 convolutions (8, 8, 8 | 12 | 16 channels): strides 8, 16, 32 in a few thousand
    weights, no batch norm and no dropout (the training tests compare runs weight for weight)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU())

        self.s8 = nn.Sequential(block(3, 8), block(8, 8), block(8, 8))
        self.s16 = block(8, 12)
        self.s32 = block(12, 16)
        self._declare([(8, [self.s8], 8), (16, [self.s16], 12), (32, [self.s32], 16)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c8 = self.s8(x)  # 1/8
        c16 = self.s16(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.s32(c16)}  # 1/32


class PooledTinyBackbone(Backbone):
    """Five 3x3 convolutions with 2x2 ceil-mode pooling (strides 8, 16, 32); the first conv is padded like
    VGG's conv1_1 so that every input size gives an output (the inference and export tests)."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]

        self.s8 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=48), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
                                *block(8, 8), *block(8, 16))
        self.s16 = nn.Sequential(*block(16, 16))
        self.s32 = nn.Sequential(*block(16, 32))
        self._declare([(8, [self.s8], 16), (16, [self.s16], 16), (32, [self.s32], 32)])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c8 = self.s8(x)  # 1/8
        c16 = self.s16(c8)  # 1/16
        return {8: c8, 16: c16, 32: self.s32(c16)}  # 1/32


class NaNFCN(FCN):
    """Always predicts NaN: drives the non-finite-loss path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


def _strided(num_classes: int = 3, skips: tuple[int, ...] = (16, 8), cls: type[FCN] = FCN, **kw) -> FCN:
    net = cls(StridedTinyBackbone(), num_classes, skips=skips, fc_channels=0, **kw)
    for conv in [net.score_fr, *net.score_skip.values()]:  # not zero: every layer learns from the first step
        nn.init.normal_(conv.weight, std=0.1)
    return net


def _pooled(num_classes: int = 5, **kw) -> FCN:
    model = FCN(PooledTinyBackbone(), num_classes, skips=(16, 8), fc_channels=32, fc_kernel=1, **kw)
    for conv in [model.score_fr, *model.score_skip.values()]:  # random, non-zero: argmax means something
        nn.init.normal_(conv.weight, std=0.3)
    return model


TINY = "tiny_fcn_test"  # the inference/export model: PooledTinyBackbone, FCN-8s with a 32-channel fc head

TINY_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "tiny_fcn8s": lambda num_classes=3, **kw: _strided(num_classes, (16, 8), **kw),
    "tiny_fcn16s": lambda num_classes=3, **kw: _strided(num_classes, (16,), **kw),
    "tiny_fcn32s": lambda num_classes=3, **kw: _strided(num_classes, (), **kw),
    "tiny_nan": lambda num_classes=3, **kw: _strided(num_classes, (16, 8), cls=NaNFCN, **kw),
    TINY: _pooled,
}


# ---- registration ----------------------------------------------------------------------------------------

@contextmanager
def tiny_models_registered() -> Iterator[list[str]]:
    """Every model of ``TINY_BUILDERS`` registered for the ``with`` block; yields their names."""
    with ExitStack() as stack:
        yield [stack.enter_context(temporarily_registered(n, b)) for n, b in TINY_BUILDERS.items()]


def tiny_model(num_classes: int = 5, seed: int = 0) -> FCN:
    """The registered ``tiny_fcn_test`` model in eval mode, the same weights for the same seed."""
    torch.manual_seed(seed)
    return fcnseg.build_model(TINY, num_classes=num_classes).eval()


def tiny_checkpoint(path: Path, num_classes: int = 5, **record) -> Path:
    """A saved ``tiny_fcn_test`` checkpoint with named classes and colours; returns its path."""
    model = tiny_model(num_classes)
    classes = [f"thing{i}" for i in range(num_classes)]
    colors = [[40 * i, 255 - 40 * i, (97 * i) % 256] for i in range(num_classes)]
    return save_checkpoint(model, path, make_record(model, classes=classes, colors=colors, **record))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- data ------------------------------------------------------------------------------------------------

def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """An RGB image of smooth colour blobs rather than pure noise, so that predicted classes form regions."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def make_folder_dataset(root: Path, n_train: int = 8, n_val: int = 2, size: tuple[int, int] = (32, 40),
                        seed: int = 0) -> Path:
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


# ---- child processes -------------------------------------------------------------------------------------

LAUNCHER = '''import sys
sys.path.insert(0, {tests!r})
from tiny_models import tiny_models_registered
from fcnseg.cli import main
with tiny_models_registered():
    code = main()
sys.exit(code)
'''


def write_launcher(folder: Path) -> Path:
    """``folder/launch.py``: ``python launch.py train ...`` is ``fcnseg train ...`` with the tiny models
    registered (a test-only model is not part of the package, so a child process must register it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "launch.py"
    path.write_text(LAUNCHER.format(tests=str(Path(__file__).resolve().parent)))
    return path


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


# ---- a damaged folder dataset (--skip-bad, data check) ---------------------------------------------------

def make_damaged_dataset(root: Path) -> Path:
    """img000..img009 without split lists (split 'all'); img001's image is cut in half, img002's mask has the
    wrong size; listing problems: a mask with no image, an image with no mask, a folder named like an image,
    and a symlink loop named like an image."""
    root = make_folder_dataset(root, n_train=8, n_val=2)
    shutil.rmtree(root / "splits")
    images, masks = root / "images", root / "masks"
    data = (images / "img001.png").read_bytes()
    (images / "img001.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(masks / "img002.png")
    shutil.copy(masks / "img000.png", masks / "orphan.png")
    shutil.copy(images / "img000.png", images / "nomask.png")
    (images / "folder.png").mkdir()
    shutil.copy(masks / "img000.png", masks / "folder.png")
    os.symlink("loop.png", images / "loop.png")
    shutil.copy(masks / "img000.png", masks / "loop.png")
    return root


BAD_FILES = {"img001.png": "truncated image", "img002.png": "but its mask"}
LISTING = {"orphan.png": "mask has no image", "nomask.png": "missing mask for sample 'nomask'",
           "folder.png": "missing image for sample 'folder' (a directory, not a file)",
           "loop.png": "missing image for sample 'loop' (a symlink loop)"}


def lines_naming(text: str, name: str) -> list[str]:
    """The lines of ``text`` that name the file ``name``."""
    return [ln for ln in text.splitlines() if f"/{name}" in ln]



def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c CODE`` in a child process with the tiny models registered (``env()``'s one thread).

    For OpenVINO's bf16 inference precision (with ``run_cli`` for the commands): a compiled bf16 model leaves
    runtime state behind in the process (observed on an AMD EPYC with AVX512-BF16: a later, unrelated test's
    subprocess call then crashed pytest with a segmentation fault), so tests that compile one do it in a child."""
    prelude = (f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
               f"from tiny_models import tiny_models_registered\n_registered = tiny_models_registered()\n"
               f"_registered.__enter__()\n")
    return subprocess.run([sys.executable, "-c", prelude + code], env=env(), capture_output=True, text=True,
                          timeout=timeout)


def vm_size() -> int:
    """This process's address-space size in bytes (the fuzz children set their memory limit above it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def png_bytes(im: Image.Image) -> bytes:
    """``im`` encoded as PNG (an upload's body)."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
