"""benchmarks/layout_precision.py: its error measure is exact for float64 and it runs end to end."""
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import REPO, load_script


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_layout_precision_benchmark_runs_and_finds_no_error_in_float64():
    """benchmarks/layout_precision.py at a tiny size: it prints both layouts and every layer, and its error measure
    is zero for a float64 pass against itself (so a non-zero figure is the float32 arithmetic, not the harness)."""
    module = load_script("benchmarks/layout_precision.py")
    layer = torch.nn.BatchNorm2d(4).train()
    x = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(0)) + 5
    y64, dx64 = module.layer_pass(layer, x, False, torch.float64)
    again, dx_again = module.layer_pass(layer, x, False, torch.float64)
    assert module.relative(again, y64) == 0.0 and module.relative(dx_again, dx64) == 0.0
    y32, _ = module.layer_pass(layer, x, True)
    assert 0.0 < module.relative(y32, y64) < 1e-4

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "layout_precision.py"), "--batch", "1",
                           "--size", "40", "48"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("NCHW ") for line in lines) and any(line.startswith("channels-last ") for line in lines)
    assert sum(line.startswith("batch norm, train mode") for line in lines) == 2
