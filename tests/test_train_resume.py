"""Resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run (CPU, same seed);
a damaged newest state is reported and the previous one used."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fcnseg.errors import FcnsegError
from fcnseg.train.state import load_state, save_state

from tiny_models import env, make_folder_dataset, read_weights, run_cli, tiny_train_args, write_launcher


def _minimal_state(step):
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "scheduler": {}, "scaler": {},
            "epoch": 0, "batch": step, "step": step, "rng": {}, "order": [1, 0]}


def test_damaged_newest_state_falls_back_to_the_previous(tmp_path, caplog):
    save_state(_minimal_state(1), tmp_path)
    save_state(_minimal_state(2), tmp_path)
    state, path = load_state(tmp_path)
    assert state["step"] == 2 and path.name == "state-last.pt"
    last = tmp_path / "state-last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    state, path = load_state(tmp_path)
    assert state["step"] == 1 and path.name == "state-prev.pt"
    assert "state-last.pt" in caplog.text and "previous state" in caplog.text
    prev = tmp_path / "state-prev.pt"
    data = bytearray(prev.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the hash catches what the zip reader might not
    prev.write_bytes(bytes(data))
    with pytest.raises(FcnsegError, match="no usable training state"):
        load_state(tmp_path)


def _step_of(ckpt):
    try:
        state, _ = load_state(ckpt)
        return int(state["step"])
    except (FcnsegError, OSError, RuntimeError):
        return -1


@pytest.mark.slow  # three training runs in child processes
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_train=8, n_val=2)
    launcher = write_launcher(tmp_path / "bin")
    extra = ["--epochs", "4", "--seed", "7", "--loss-sample", "0.7", "--schedule", "cosine", "--warmup-steps", "3",
             "--checkpoint-every-steps", "1", "--no-plots", "--no-amp"]  # amp auto's timed choice could differ
    total = 4 * 4

    ref = run_cli(launcher, *tiny_train_args(data, tmp_path / "ref", *extra))
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(launcher), *tiny_train_args(data, run, *extra)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        step = -1
        while time.time() < deadline and proc.poll() is None:
            step = _step_of(run / "checkpoints")
            if step >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _step_of(run / "checkpoints")
    assert 5 <= killed_at < total, killed_at

    # damage the newest state as a torn write would (whatever moment the kill hit, state-prev.pt or the
    # state it was being rotated into is intact): the resume reports the damage and uses the previous one
    ckpt = run / "checkpoints"
    (ckpt / "state-last.pt").write_bytes((ckpt / "state-prev.pt").read_bytes()[:100])
    res = run_cli(launcher, "train", "--resume", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "state-last.pt" in res.stderr and "previous state" in res.stderr
    assert "resuming" in res.stderr

    a = read_weights(tmp_path / "ref" / "checkpoints" / "last.safetensors")
    b = read_weights(run / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["step"] == total
