"""Training speed defaults: ``amp: auto`` decides by a timed probe (here: a stand-in clock) only where bf16 is
native, the probe leaves no trace, and a run whose probe chose float32 trains exactly like ``amp: false``."""
import json

import pytest
import torch
import torch.nn as nn

import fcnseg.hardware
from fcnseg.config import TrainConfig, from_dict
from fcnseg.errors import FcnsegError
from fcnseg.train import amp as amp_mod
from fcnseg.train.engine import SegmentationLoss

from tiny_models import make_folder_dataset, read_weights

CPU = torch.device("cpu")


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 3, (2, 16, 16), generator=g)


class _Clock:
    """Stands in for ``time_train_step``: given seconds per precision, and a record of the calls."""

    def __init__(self, fp32: float, bf16: float):
        self.seconds = {None: fp32, torch.bfloat16: bf16}
        self.calls = []

    def __call__(self, model, loss_fn, images, masks, dtype):
        self.calls.append(dtype)
        return self.seconds[dtype]


@pytest.mark.parametrize("native, fp32, bf16, want", [
    (True, 0.2, 0.1, torch.bfloat16),  # native and faster: bf16
    (True, 0.1, 0.2, None),  # native but slower (it happens): float32
    (True, 0.2, 0.19, None),  # a near tie is noise: float32, the exact path
    (True, 0.2, 0.17, None),  # 18% faster, what the EPYCs' probes showed: not enough to change numerics
    (True, 0.2, 0.16, torch.bfloat16),  # 25% faster: bf16
    (True, 0.01, 0.005, None),  # overhead-bound steps: not worth a change of numerics
    (False, 0.2, 0.1, None),  # not native: no probe at all
])
def test_amp_auto_decides_by_the_probe_where_bf16_is_native(monkeypatch, native, fp32, bf16, want):
    monkeypatch.setattr(fcnseg.hardware, "native_bf16_cpu", lambda: native)
    clock = _Clock(fp32, bf16)
    model = nn.Conv2d(3, 3, 1)
    dtype, decision = amp_mod.choose_amp(TrainConfig(amp="auto"), model, SegmentationLoss(), _batch(), CPU,
                                         timer=clock)
    assert dtype is want and decision["amp"] == "auto"
    assert decision["dtype"] == ("bfloat16" if want else "float32")
    if native and fp32 < amp_mod.AMP_MIN_STEP_S:
        assert clock.calls == [None] and "too short" in decision["reason"]
    elif native:
        assert clock.calls == [None, torch.bfloat16, torch.bfloat16, None] and decision["bfloat16_step_s"] == bf16
    else:
        assert clock.calls == [] and "no native bf16" in decision["reason"]


def test_amp_auto_takes_each_precisions_best_of_alternating_probes(monkeypatch):
    """A machine that was busy during the first float32 probe must not hand bf16 the win: the probes alternate
    (float32, bf16, bf16, float32) and each precision's best counts; all timings are recorded."""
    monkeypatch.setattr(fcnseg.hardware, "native_bf16_cpu", lambda: True)
    seconds = iter([0.30, 0.25, 0.20, 0.21])  # a single float32/bf16 pair would say 0.30 against 0.25: bf16
    calls = []

    def clock(model, loss_fn, images, masks, dtype):
        calls.append(dtype)
        return next(seconds)

    dtype, decision = amp_mod.choose_amp(TrainConfig(amp="auto"), nn.Conv2d(3, 3, 1), SegmentationLoss(), _batch(),
                                         CPU, timer=clock)
    assert calls == [None, torch.bfloat16, torch.bfloat16, None]
    assert dtype is None and decision["float32_step_s"] == 0.21 and decision["bfloat16_step_s"] == 0.2
    assert decision["timings_s"] == {"float32": [0.3, 0.21], "bfloat16": [0.25, 0.2]}


def test_a_slow_first_probe_of_a_short_step_does_not_hand_bf16_the_win(monkeypatch):
    """The tiny nets of the tests: a cold first float32 pass over 0.1 s (a busy machine), then a few ms each. The
    best float32 time decides that the step is too short, as it does where the first pass is already fast (a
    run chose bf16 here once, and its same-seed twin float32)."""
    monkeypatch.setattr(fcnseg.hardware, "native_bf16_cpu", lambda: True)
    seconds = iter([0.13, 0.0049, 0.005, 0.013])

    def clock(model, loss_fn, images, masks, dtype):
        return next(seconds)

    dtype, decision = amp_mod.choose_amp(TrainConfig(amp="auto"), nn.Conv2d(3, 3, 1), SegmentationLoss(), _batch(),
                                         CPU, timer=clock)
    assert dtype is None and decision["dtype"] == "float32" and "too short" in decision["reason"]
    assert decision["float32_step_s"] == 0.013 and decision["timings_s"]["bfloat16"] == [0.0049, 0.005]


def test_amp_true_or_false_is_taken_as_set(monkeypatch):
    monkeypatch.setattr(fcnseg.hardware, "native_bf16_cpu", lambda: False)
    clock = _Clock(0.1, 0.2)
    for amp, want in ((True, torch.bfloat16), (False, None)):
        dtype, decision = amp_mod.choose_amp(TrainConfig(amp=amp), nn.Conv2d(3, 3, 1), SegmentationLoss(), None, CPU,
                                             timer=clock)
        assert dtype is want and decision["reason"] == "set by amp"
    assert clock.calls == []


def test_config_defaults_and_amp_values():
    cfg = TrainConfig()
    assert cfg.amp == "auto" and cfg.channels_last is True
    assert from_dict({"amp": "auto"}).amp == "auto" and from_dict({"amp": "false"}).amp is False
    with pytest.raises(FcnsegError, match="amp must be true, false or auto"):
        from_dict({"amp": "sometimes"}).validate()


def test_the_probe_leaves_no_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.5),
                          nn.Conv2d(8, 3, 1)).eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = amp_mod.time_train_step(model, SegmentationLoss(), *_batch(), None, steps=2)
    assert seconds > 0 and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[4].weight.grad is None


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_a_run_whose_probe_chose_float32_trains_like_amp_false(tmp_path, monkeypatch):
    """The real probe runs (a stand-in only makes bf16 look slower), then the run must be
    exactly the amp: false run: same seed, same weights; the decision is in version.json."""
    from fcnseg.cli import main

    data = make_folder_dataset(tmp_path / "data", n_train=6, n_val=0)
    monkeypatch.setattr(fcnseg.hardware, "native_bf16_cpu", lambda: True)
    real = amp_mod.probe_or_time_here
    probed = []

    def slower_bf16(model, loss_fn, images, masks, dtype, **arch):
        probed.append(dtype)
        seconds = real(model, loss_fn, images, masks, dtype, **arch)  # the real probe (tiny_fcn8s: timed here)
        return seconds + 1 if dtype is None else seconds + 1e3  # long steps, so that the bf16 probe runs too

    monkeypatch.setattr(amp_mod, "probe_or_time_here", slower_bf16)

    def train(out, *amp):
        assert main(["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "2",
                     "--batch-size", "3", "--lr", "0.01", "--crop-size", "24", "24", "--workers", "0",
                     "--val-split", "none", "--no-progress", "--no-plots", *amp, "--out", str(out)]) == 0
        return read_weights(out / "checkpoints" / "last.safetensors")

    auto, off = train(tmp_path / "auto"), train(tmp_path / "off", "--no-amp")
    assert probed == [None, torch.bfloat16, torch.bfloat16, None]  # two rounds, for the auto run only
    assert all(torch.equal(auto[k], off[k]) for k in off)
    recorded = json.loads((tmp_path / "auto" / "version.json").read_text())["amp"]
    assert recorded["amp"] == "auto" and recorded["dtype"] == "float32" and recorded["bfloat16_step_s"] > 1e3
    assert json.loads((tmp_path / "off" / "version.json").read_text())["amp"]["reason"] == "set by amp"


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_the_probe_runs_in_a_fresh_process(monkeypatch):
    """The default probe builds the registered architecture in another process and times it there on data of the
    batch's shape and layout: this process's own timer never runs (so nothing the passes do stays here), and
    the model, its gradients and the random stream are untouched."""
    import fcnseg

    torch.manual_seed(0)
    model = fcnseg.build_model("fcn8s_efficientnet_lite0", num_classes=3, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    rng = torch.get_rng_state()

    def not_here(*args, **kwargs):
        raise AssertionError("timed in the training process")

    monkeypatch.setattr(amp_mod, "time_train_step", not_here)
    seconds = amp_mod.probe_or_time_here(model, SegmentationLoss(torch.ones(3)), images.contiguous(
        memory_format=torch.channels_last), masks, None, arch="fcn8s_efficientnet_lite0", model_kwargs={})
    assert 0 < seconds < 60
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_an_architecture_only_this_process_knows_is_timed_here_and_logged(caplog):
    """An architecture registered in this process only (tests' tiny nets, a user's own) cannot be built in the
    probe process: it is timed here instead, and the log says why."""
    from tiny_models import tiny_model

    model = tiny_model()
    images = torch.randn(2, 3, 16, 16)
    masks = torch.randint(0, model.num_classes, (2, 16, 16))
    with caplog.at_level("INFO", logger="fcnseg.train.amp"):
        seconds = amp_mod.probe_or_time_here(model, SegmentationLoss(), images, masks, None,
                                             arch="tiny_fcn8s", model_kwargs={})
    assert seconds > 0
    assert "could not time float32 in a fresh process" in caplog.text and "tiny_fcn8s" in caplog.text


@pytest.mark.parametrize("flags, want", [([], [()]), (["--malloc", "system"], [])])
def test_fcnseg_train_reuses_freed_memory_unless_told_not_to(tmp_path, monkeypatch, flags, want):
    """The command (its process is the run's) opts in to glibc keeping freed blocks, before training;
    ``--malloc system`` keeps the C library's defaults. ``fit`` itself never touches the allocator."""
    import fcnseg.train
    from fcnseg.cli import main

    calls, order = [], []
    monkeypatch.setattr(fcnseg.hardware, "reuse_freed_memory", lambda *a: calls.append(a) or order.append("malloc"))
    monkeypatch.setattr(fcnseg.train, "fit", lambda cfg, **kw: order.append("fit") or {})
    root = make_folder_dataset(tmp_path / "data")
    assert main(["train", "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "run"), *flags]) == 0
    assert calls == want and order[-1] == "fit" and order[:-1] == ["malloc"] * len(want)


@pytest.mark.parametrize("reusing", [True, False])
def test_the_probe_process_allocates_as_the_training_process_does(monkeypatch, reusing):
    """The timing child is told whether this process reuses freed memory, and does the same before timing."""
    import io
    import subprocess

    jobs = []

    def child(args, input, **kw):  # the parent's side: capture the job; the child's side runs here below
        jobs.append(json.loads(input))
        return subprocess.CompletedProcess(args, 0, stdout="0.25\n", stderr="")

    monkeypatch.setattr(fcnseg.hardware, "_reusing", reusing)
    monkeypatch.setattr(amp_mod.subprocess, "run", child)
    images, masks = _batch()
    seconds = amp_mod.probe_train_step("fcn8s_efficientnet_lite0", {}, SegmentationLoss(), images, 3, None, steps=1)
    assert seconds == 0.25
    assert jobs[0]["reuse_freed_memory"] is reusing

    opted = []
    monkeypatch.setattr(amp_mod, "reuse_freed_memory", lambda: opted.append(True))
    monkeypatch.setattr(amp_mod, "time_train_step", lambda *a, **kw: 0.5)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(jobs[0])))
    threads = torch.get_num_threads()
    try:
        amp_mod._probe_child()
    finally:
        torch.set_num_threads(threads)
    assert opted == ([True] if reusing else [])
