"""benchmarks/evaluate_speed.py runs end to end and reports medians of its repeated measurements."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a few fresh processes for the model-only figure
def test_it_prints_each_measurement_and_their_median():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "evaluate_speed.py"), "--model",
                           "fcn32s_efficientnet_lite0", "--synthetic", "4", "--size", "32", "48", "--batch-size", "1",
                           "--workers", "0", "--iters", "2", "--repeats", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    evaluate = re.search(r"evaluate path\s+([\d.]+) images/s\s+median of ([\d., ]+) \(", done.stdout)
    model = re.search(r"model only\s+([\d.]+) images/s\s+median of ([\d., ]+) \(", done.stdout)
    ratio = re.search(r"ratio\s+([\d.]+)", done.stdout)
    assert evaluate and model and ratio, done.stdout
    for match in (evaluate, model):
        values = sorted(float(v) for v in match.group(2).split(", "))
        assert len(values) == 3 and float(match.group(1)) == values[1]
    assert float(ratio.group(1)) == pytest.approx(float(evaluate.group(1)) / float(model.group(1)), abs=0.01)
