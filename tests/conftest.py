"""Fixtures shared by the test modules: the tiny models registered, a tiny checkpoint, tiny image folders,
a tiny folder dataset and a fresh run directory (the helpers behind them live in tiny_models.py)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tiny_models import make_folder_dataset, random_image, tiny_checkpoint, tiny_models_registered


# one marker per optional part (registered in pyproject.toml): a marked test skips, with the reason and the fix,
# where the part is missing. CI (`make test`) installs all of them, so nothing is skipped there.
OPTIONAL = {
    "openvino": ("openvino", "pip install openvino: the 'openvino' extra"),
    "browser": ("playwright.sync_api", "pip install playwright, then `make chromium`"),
    "torchfcn": ("torchfcn", "pip install --no-deps torchfcn==1.9.7"),
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (module, fix) in OPTIONAL.items():
        if item.get_closest_marker(marker) is None:
            continue
        if marker == "torchfcn":  # importing torchfcn itself needs its chainer-based 'fcn' (the tests stub it)
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{marker}: {module} is not installed ({fix})")
        else:
            pytest.importorskip(module, reason=f"{marker}: {module} is not installed ({fix})")
        if marker == "browser" and not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
            pytest.skip("browser: Chromium is not installed (`make chromium`)")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, through Playwright) for the page tests, which carry the browser marker."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make chromium` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright  # the browser marker skips without it

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session", autouse=True)
def tiny() -> Iterator[list[str]]:
    """The tiny test models (tiny_models.TINY_BUILDERS) are registered for the whole session: checkpoints of
    them are loaded by name in many modules. This runs after collection, so the registry contract
    (parametrised over ``fcnseg.list_models()`` when collected) covers only the package's models."""
    with tiny_models_registered() as names:
        yield names


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test (these modules time single-image work and share 2 cores with the
    loader or a server), set back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    """A saved 5-class ``tiny_fcn_test`` checkpoint (classes thing0..thing4)."""
    return tiny_checkpoint(tmp_path / "ckpt" / "tiny.safetensors")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``in/a.png`` (45x70), ``in/b.jpg`` (64x48) and ``in/more/c.png`` (33x41): smooth random images."""
    folder = tmp_path / "in"
    (folder / "more").mkdir(parents=True)
    random_image(45, 70, 1).save(folder / "a.png")
    random_image(64, 48, 2).save(folder / "b.jpg", quality=95)
    random_image(33, 41, 3).save(folder / "more" / "c.png")
    return folder


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """A 3-class ``folder`` dataset of 8 training and 2 validation images of 32x40 pixels."""
    return make_folder_dataset(tmp_path / "data")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory that does not exist yet (``fcnseg train`` refuses to reuse one)."""
    return tmp_path / "run"
