"""Command-line smoke tests: the parser, `fcnseg models`, `fcnseg convert --help`, and the entry points."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fcnseg
from fcnseg.cli import main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fcnseg") and "models" in out and "convert" in out


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "usage: fcnseg" in capsys.readouterr().out


def test_convert_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--from {torchfcn,caffe}" in out and "--arch" in out and "--num-classes" in out and "--classes-file" in out


def test_convert_needs_a_source(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "in.pth", "out"])
    assert exit_.value.code == 2 and "--from" in capsys.readouterr().err


def test_models_lists_every_architecture(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for name in fcnseg.list_models():
        assert name in rows, name
        assert int(rows[name][1].replace(",", "")) > 0
    assert rows["fcn32s_vgg16"][-1] == "32" and rows["fcn8s_vgg16"][-1] == "8"
    assert "134," in rows["fcn8s_vgg16"][1][:4]  # 134M parameters, as in the paper's VGG16 FCNs


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_the_entry_points_run():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fcnseg", "--help"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0 and "convert" in proc.stdout
    script = shutil.which("fcnseg", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the fcnseg console script is not installed beside this Python")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fcnseg {fcnseg.__version__}"
