"""Training across machines with torchrun's elastic launcher, as two "nodes" (two torchrun agents) on one host.

Two agents joined by a c10d rendezvous give the same weights as the two-process ``--standalone`` run (the same
world size, so the same gradient reduction: bit for bit). With ``--max-restarts 1`` a rank killed with SIGKILL
makes both agents restart their workers; the job continues from the newest resume state and ends with the
uninterrupted run's weights (bit for bit: resume restores the position, optimiser and schedule exactly and the
reduction order is the same), and ``OUT/elastic.json`` records the restart.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_models import env, make_folder_dataset, read_weights, write_launcher

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "3",
            "--batch-size", "2", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "poly",
            "--crop-size", "32", "32", "--workers", "0", "--threads", "1", "--seed", "11", "--loss-reduction", "mean",
            "--device", "cpu", "--no-progress", "--no-plots", "--out", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(launcher: Path, args: list[str], *extra: str) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"fcnseg-{port}",
           *extra, str(launcher), *args]
    # as docs/scale.md says: restarted workers get a fresh store per round; on the rendezvous store torchrun
    # shares by default, a restarted rank 1 once read rank 0's address of the killed round (gloo: connection
    # refused) and the job failed for want of a second restart
    e = dict(env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    data = make_folder_dataset(root / "data", n_train=24, n_val=2)
    launcher = write_launcher(root / "bin")
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(launcher), *train_args(data, root / "standalone")],
                         env=env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root, data, launcher, read_weights(root / "standalone" / "checkpoints" / "last.safetensors")


def assert_same_weights(path: Path, ref: dict[str, torch.Tensor]) -> None:
    got = read_weights(path)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), (k, float((got[k] - ref[k]).abs().max()))


def test_two_torchrun_nodes_match_the_two_process_run(setup):
    root, data, launcher, ref = setup
    nodes = two_nodes(launcher, train_args(data, root / "nodes"))
    results = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [e[-2000:] for _, e in results]
    assert_same_weights(root / "nodes" / "checkpoints" / "last.safetensors", ref)
    record = json.loads((root / "nodes" / "elastic.json").read_text())
    assert record["restarts"] == 0 and record["world_size"] == 2


def test_a_killed_rank_restarts_from_the_resume_state_with_the_same_weights(setup):
    root, data, launcher, ref = setup
    out = root / "killed"
    nodes = two_nodes(launcher, train_args(data, out), "--max-restarts", "1")
    killed, deadline = None, time.monotonic() + 400
    while killed is None and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
        # metrics.jsonl gets its row before the epoch's resume state is written: wait for the state's digest
        # (written last, after the state file itself) so the restart has a state to continue from
        saved = (out / "checkpoints" / "state-last.pt.sha256").exists()
        workers = children(nodes[1].pid)
        if saved and workers:  # epoch 1's resume state is saved; the rank dies in a later epoch
            os.kill(workers[0], signal.SIGKILL)
            killed = len((out / "metrics.jsonl").read_text().splitlines())
        time.sleep(0.05)
    results = [n.communicate(timeout=600) for n in nodes]
    for i, (_, err) in enumerate(results):
        (root / f"killed-node{i}.log").write_text(err)
    assert killed is not None and killed < 3, "the run ended before a rank could be killed mid-run"
    assert [n.returncode for n in nodes] == [0, 0], [e[-5000:] for _, e in results]
    assert json.loads((out / "elastic.json").read_text())["restarts"] == 1
    assert "resuming" in results[0][1] + results[1][1]  # rank 0, on either node, continued from the saved state
    assert_same_weights(out / "checkpoints" / "last.safetensors", ref)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # the resumed run dropped nothing and repeated nothing
