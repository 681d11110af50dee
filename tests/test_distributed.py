"""DistributedDataParallel: 2 processes with gloo on CPU match one process with the same global batch.

Tolerance: every weight within 1e-6 (absolute) + 1e-5 (relative) of the single-process run after 4 SGD
steps (observed: about 1.5e-8); the processes reduce gradients in a different order than one process
sums them, so the last bits may differ. The tiny model has no batch norm and no dropout (per-process statistics and random
streams would differ by design).
"""
import json
import subprocess
import sys

import pytest
import torch

from tiny_models import env, make_folder_dataset, read_weights, run_cli, write_launcher

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _args(data, out, batch):
    return ["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "2",
            "--batch-size", str(batch), "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "poly",
            "--crop-size", "32", "32", "--workers", "0", "--threads", "1", "--seed", "11", "--loss-reduction", "mean",
            "--device", "cpu", "--no-progress", "--no-plots", "--out", str(out)]


@pytest.mark.slow  # a torch.distributed launch of two processes beside a single-process run
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_train=8, n_val=3)
    launcher = write_launcher(tmp_path / "bin")

    single = run_cli(launcher, *_args(data, tmp_path / "single", 4))
    assert single.returncode == 0, single.stderr[-2000:]

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher),
           *_args(data, tmp_path / "ddp", 2)]
    ddp = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stderr

    a = read_weights(tmp_path / "single" / "checkpoints" / "last.safetensors")
    b = read_weights(tmp_path / "ddp" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, float((a[k] - b[k]).abs().max()))

    rows_1 = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    rows_2 = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_2] == [r["step"] for r in rows_1] == [2, 4]  # rank 0 wrote each line once
    for r1, r2 in zip(rows_1, rows_2):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)  # reduced over processes
        assert r2["val"]["num_pixels"] == r1["val"]["num_pixels"] == 3 * 31 * 40  # shards summed, none twice
        assert r2["val"]["pixel_accuracy"] == pytest.approx(r1["val"]["pixel_accuracy"], abs=1e-3)


@pytest.mark.slow
def test_skip_bad_with_two_processes_checks_once_and_names_each_file_once(tmp_path):
    from tiny_models import BAD_FILES, LISTING, lines_naming, make_damaged_dataset

    data = make_damaged_dataset(tmp_path / "data")
    launcher = write_launcher(tmp_path / "bin")
    args = [*_args(data, tmp_path / "ddp", 2), "--split", "all", "--val-split", "none", "--skip-bad"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher), *args]
    ddp = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for name in {**BAD_FILES, **LISTING}:
        assert len(lines_naming(ddp.stderr, name)) == 1, name  # rank 0 only
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    # 8 good samples over 2 processes x 2 images: 2 steps per epoch, the same index on both processes
    assert [(r["step"], r["skipped_samples"], r["listing_problems"]) for r in rows] == [(2, 2, 4), (4, 2, 4)]
