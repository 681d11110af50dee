"""Benchmark: a fresh process per configuration, the promised JSON keys, FLOP counting, and the table."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from fcnseg import build_model
from fcnseg.evaluation.benchmark import RESULT_KEYS, benchmark, count_flops, format_results
from fcnseg.cli import main


def test_count_flops_of_a_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, torch.zeros(2, 3, 10, 12)) == 2 * 2 * 8 * 3 * 9 * 10 * 12


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_benchmark_runs_in_a_fresh_process():
    r = benchmark({"model": "fcn32s_googlenet", "size": [64, 80], "warmup": 1, "iters": 2, "threads": 1,
                   "num_classes": 3}, env={"OMP_NUM_THREADS": "1"})
    assert set(RESULT_KEYS) <= set(r)
    # what the child computed, recomputed here: the FLOPs of this model at this size, and the rates from the median
    want_gflops = count_flops(build_model("fcn32s_googlenet", num_classes=3).eval(), torch.zeros(1, 3, 64, 80)) / 1e9
    assert r["gflops_per_batch"] == pytest.approx(want_gflops, rel=1e-9) and want_gflops > 1
    assert r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_p95"] and r["latency_ms_min"] > 0
    assert r["images_per_second"] == pytest.approx(1000 / r["latency_ms_median"])
    assert r["gflops_per_second"] == pytest.approx(want_gflops * 1000 / r["latency_ms_median"])
    assert r["iters"] == 2 and r["threads"] == 1 and r["size"] == [64, 80] and r["batch"] == 1
    # the weights alone (24 MB in float32) are resident during inference, and counted
    assert r["peak_memory_mb"] > 20
    assert "clear_refs" in r["peak_memory_method"] or "ru_maxrss" in r["peak_memory_method"]
    assert "configuration" in format_results([r])


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_benchmark_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["benchmark", "--model", "fcn32s_googlenet", "--size", "64", "64", "--iters", "2", "--warmup", "1",
                 "--threads", "1", "--dtype", "bfloat16", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(RESULT_KEYS) <= set(result) and result["dtype"] == "bfloat16"
    assert "median ms" in capsys.readouterr().out


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_benchmark_failure_is_one_error():
    from fcnseg.errors import FcnsegError

    with pytest.raises(FcnsegError, match="benchmark of no_such_model failed"):
        benchmark({"model": "no_such_model", "size": [32, 32], "iters": 1})
