"""``optimize``: a converted copy by default, the caller's model untouched, no class surgery, no
process-wide switch flipped; batch-norm folding keeps a real EfficientNet-Lite0 FCN's output."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fcnseg
from fcnseg.inference.segmenter import Segmenter
from fcnseg.hardware import flush_denormal
from fcnseg.inference.optimize import BigWeightConv2d, fold_batchnorm, optimize

from tiny_models import random_image, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _flushing() -> bool:
    return bool((torch.tensor([1e-40]) * 1)[0] == 0)


@pytest.fixture
def no_flush():
    """Start from the default (subnormals kept), whatever an earlier in-process CLI call did; restore it."""
    was = _flushing()
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(was)


class BNNet(nn.Module):
    """Conv-BN pairs, a big 1x1 conv, and a K-channel output: enough for every conversion to act."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.big = nn.Conv2d(16, 64, 1)  # 4 KB of weight: "big" with big_weight_bytes=1024
        self.score = nn.Conv2d(64, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(torch.relu(self.big(self.body(x))))


def bn_net(seed: int = 0) -> BNNet:
    torch.manual_seed(seed)
    net = BNNet()
    for bn in (net.body[1], net.body[4]):  # statistics far from the defaults, so a lost fold would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return net.eval()


def _snapshot(model: nn.Module) -> dict:
    return {"types": [(n, type(m)) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "strides": {k: v.stride() for k, v in model.state_dict().items()},
            "training": model.training}


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    assert [(n, type(m)) for n, m in model.named_modules()] == snap["types"]
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in state.items():
        assert v.dtype == snap["state"][k].dtype and torch.equal(v, snap["state"][k]), k
        assert v.stride() == snap["strides"][k], f"{k}: memory format changed"
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert model.training == snap["training"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optimize_returns_a_copy_and_leaves_the_model_alone(dtype):
    model = bn_net().train()  # a model still in training: optimize must not put it in eval mode
    snap = _snapshot(model)
    fast = optimize(model, dtype, channels_last=True, big_weight_bytes=1024)
    assert fast is not model
    _assert_unchanged(model, snap)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert isinstance(fast.big, BigWeightConv2d)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and type(model.big) is nn.Conv2d


def test_inplace_converts_the_model_itself():
    model = bn_net()
    ref = copy.deepcopy(model)
    assert optimize(model, channels_last=True, big_weight_bytes=1024, inplace=True) is model
    assert isinstance(model.body[1], nn.Identity) and isinstance(model.body[4], nn.Identity)
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_segmenter_does_not_change_the_callers_model(dtype):
    model = bn_net()
    snap = _snapshot(model)
    seg = Segmenter(model, dtype=dtype, channels_last=True)
    assert seg.model is not model
    seg(random_image(40, 56))
    _assert_unchanged(model, snap)


def test_no_class_is_rewritten(monkeypatch):
    """Every module keeps the class it was built with; replacements go through their parent."""
    rewrites = []
    original = nn.Module.__setattr__

    def spy(self, name, value):
        if name == "__class__":
            rewrites.append((type(self).__name__, value))
        original(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", spy)
    fast = optimize(bn_net(), "bfloat16", big_weight_bytes=1024)
    assert rewrites == []
    # the replacements are new modules of their own classes; the big convolution keeps its state-dict keys
    assert type(fast.body[1]) is nn.Identity and type(fast.big) is BigWeightConv2d
    keys = set(bn_net().state_dict())
    folded = {k for k in keys if not k.startswith(("body.1.", "body.4."))} | {"body.0.bias"}  # the BN's shift
    assert set(fast.state_dict()) == folded


def test_optimize_flips_no_process_wide_switch(no_flush):
    assert not _flushing()
    fast = optimize(bn_net(), big_weight_bytes=1024)
    Segmenter(bn_net())(random_image(24, 24))
    assert torch.tensor([1e-40]) * 1 != 0  # subnormals still computed in the calling thread
    with torch.no_grad():
        fast(torch.randn(1, 3, 16, 16))
    assert torch.tensor([1e-40]) * 1 != 0


def test_flush_denormal_is_an_explicit_block(no_flush):
    with flush_denormal() as supported:
        if supported:  # x86 with SSE3; elsewhere torch reports it cannot
            assert _flushing()
    assert not _flushing()


def test_optimizing_twice_replaces_the_first_casts():
    """bfloat16 then float32: the second conversion must not keep casting inputs to bfloat16."""
    twice = optimize(optimize(tiny_model(), "bfloat16", big_weight_bytes=0), "float32", big_weight_bytes=0)
    ref = tiny_model()
    ref.load_state_dict({k: v.float() for k, v in twice.state_dict().items()})
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        assert torch.allclose(twice(x), ref(x), atol=1e-5)


def test_fold_batchnorm_keeps_timm_activations():
    """timm's BatchNormAct2d is replaced by its activation, so the ReLU after the folded BN still runs."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BatchNormAct2d(6, act_layer=nn.ReLU)).eval()
    net[1].running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net) == 1
        assert isinstance(net[1], nn.ReLU)
        assert torch.allclose(net(x), before, atol=1e-5) and (before == 0).any()


def test_folded_efficientnet_lite0_fcn_matches_the_unfolded_one():
    torch.manual_seed(0)
    model = fcnseg.build_model("fcn8s_efficientnet_lite0", num_classes=11, pretrained=True).eval()
    for conv in [model.score_fr, *model.score_skip.values()]:
        nn.init.normal_(conv.weight, std=conv.in_channels ** -0.5)  # fresh score layers output zeros
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fast = optimize(model, "float32", channels_last=True)
    assert n_bn > 40 and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        y, yf = model(x), fast(x)
    assert torch.allclose(yf, y, rtol=1e-3, atol=1e-3 * float(y.abs().max()))
    assert (yf.argmax(1) == y.argmax(1)).float().mean() > 0.999


def test_a_model_that_cannot_be_copied_gets_a_clear_error():
    import threading

    from fcnseg.errors import FcnsegError

    model = bn_net()
    model.lock = threading.Lock()  # like a runtime session: no deep copy
    with pytest.raises(FcnsegError, match="cannot copy this BNNet.*inplace=True"):
        optimize(model)
    with pytest.raises(FcnsegError, match="inplace=True"):
        Segmenter(model)
    assert optimize(model, inplace=True) is model


def test_the_cli_flushes_subnormals_only_while_a_model_command_runs(monkeypatch, no_flush, tmp_path):
    import fcnseg.cli.models
    import fcnseg.cli.predict
    from fcnseg.cli import main

    seen = {}
    monkeypatch.setattr(fcnseg.cli.predict, "run", lambda args: seen.setdefault("predict", _flushing()) and 0)
    monkeypatch.setattr(fcnseg.cli.models, "run", lambda args: seen.setdefault("models", _flushing()) and 0)
    assert main(["predict", "x.png", "--out", str(tmp_path)]) == 0
    assert main(["models"]) == 0
    with flush_denormal() as supported:
        pass
    assert seen == {"predict": supported, "models": False}
    assert not _flushing()  # the setting ends with the command


_FAULTS_CHILD = """
import resource, sys
import torch
from fcnseg.hardware import reuse_freed_memory, reusing_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory() and reusing_freed_memory()
else:
    assert not reusing_freed_memory()
def blocks(n):
    for _ in range(n):
        x = torch.ones(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
        del x
        small = [object() for _ in range(1000)]  # other allocations in between, as in a real step
blocks(8)  # the heap settles (an aligned block may not fit the first holes)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_reuse_freed_memory_stops_faulting_in_large_blocks_again():
    """With glibc's defaults each 64 MiB block is a fresh mapping whose 16384 pages fault in again; after
    ``reuse_freed_memory`` (in a child: the setting is process-wide) freed blocks are reused."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_CHILD, mode], capture_output=True, text=True,
                             check=True, timeout=120)
        return int(out.stdout.split()[-1])

    system, reuse = faults("system"), faults("reuse")
    assert system > 20 * 16384 * 0.9, system  # every block faulted in anew
    assert reuse < 5 * 16384, reuse  # a quarter of that at most: freed blocks were reused
