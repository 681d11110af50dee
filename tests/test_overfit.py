"""Training learns, on the real ``fcnseg train`` path: a tiny net overfits two images (the loss halves, mean IU
rises), the learning rate follows the schedule step by step, and an interrupted run resumes to exactly the
weights of an uninterrupted one, which training has moved away from the initial weights."""
from __future__ import annotations

import json

import pytest
import torch

from fcnseg.train.optim import lr_factor

from tiny_models import make_folder_dataset, read_weights

EPOCHS, LR = 30, 0.02  # two images, batch 2: one optimiser step per epoch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two training images, validated on themselves: what a net that learns must fit."""
    root = make_folder_dataset(tmp_path_factory.mktemp("pair"), n_train=2, n_val=0)
    (root / "splits" / "val.txt").write_text((root / "splits" / "train.txt").read_text())
    return root


def _args(data, out, *extra: str) -> list[str]:
    return ["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--batch-size", "2",
            "--optimizer", "adamw", "--weight-decay", "0", "--crop-size", "32", "40", "--scale-range", "1", "1",
            "--set", "jitter=0", "--set", "flip=false", "--workers", "0", "--seed", "0", "--no-amp", "--no-plots",
            "--no-progress", "--out", str(out), *extra]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_net_overfits_two_images(tiny, pair, tmp_path):
    from fcnseg.cli import main

    run = tmp_path / "run"
    assert main(_args(pair, run, "--epochs", str(EPOCHS), "--lr", str(LR), "--schedule", "fixed",
                      "--warmup-steps", "0")) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, EPOCHS + 1))
    first, last = rows[0], rows[-1]
    assert last["train_loss"] < 0.5 * first["train_loss"], (first["train_loss"], last["train_loss"])
    assert last["val"]["mean_iou"] > first["val"]["mean_iou"] + 0.2, (first["val"], last["val"])
    assert last["val"]["pixel_accuracy"] > 0.9


def test_the_learning_rate_follows_the_schedule_step_by_step(tiny, pair, tmp_path):
    from fcnseg.cli import main

    run, epochs, warmup = tmp_path / "run", 6, 2
    assert main(_args(pair, run, "--epochs", str(epochs), "--lr", "0.01", "--schedule", "poly",
                      "--warmup-steps", str(warmup))) == 0
    # each row logs the rate the next step will use: after step s, lr * lr_factor(s)
    got = [r["lr"] for r in _rows(run)]
    want = [0.01 * lr_factor(s, epochs, "poly", warmup, 0.001, 0.9, 0.0) for s in range(1, epochs + 1)]
    assert got == pytest.approx(want, rel=1e-6)
    assert got[-1] < got[warmup]  # and it decays


class _Killed(KeyboardInterrupt):
    """What Ctrl-C raises in the middle of a run."""


def test_an_interrupted_run_resumes_to_the_same_weights(tiny, pair, tmp_path, monkeypatch):
    """The cosine schedule and the loss sampling's random draws must both be restored for the weights to match."""
    import fcnseg.train.run as run_mod
    from fcnseg.cli import main
    from fcnseg.train.state import load_state

    extra = ["--epochs", "6", "--lr", "0.02", "--schedule", "cosine", "--warmup-steps", "0", "--loss-sample", "0.6",
             "--checkpoint-every-steps", "1", "--val-split", "none"]
    assert main(_args(pair, tmp_path / "ref", *extra)) == 0
    ref = read_weights(tmp_path / "ref" / "checkpoints" / "last.safetensors")

    save = run_mod.save_resume_state

    def save_then_stop(run, at=None):
        save(run, at)
        if at is not None and at.step == 3:
            raise _Killed

    monkeypatch.setattr(run_mod, "save_resume_state", save_then_stop)
    assert main(_args(pair, tmp_path / "cut", *extra)) == 130  # interrupted after step 3's state was saved
    monkeypatch.setattr(run_mod, "save_resume_state", save)
    at_cut = load_state(tmp_path / "cut" / "checkpoints")[0]["model"]
    assert not all(torch.equal(at_cut[k], ref[k]) for k in ref), "the last three steps changed nothing"
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    got = read_weights(tmp_path / "cut" / "checkpoints" / "last.safetensors")
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(got[k], ref[k])]
