"""Exact train-mode batch norm in channels-last (fcnseg.train.batchnorm)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fcnseg.train.batchnorm import batch_norm, exact_batch_norm

CL = torch.channels_last


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach().double() - reference).norm() / reference.norm())


def _pass(x, weight, bias, grad, fn):
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    y = fn(x, None, None, weight, bias, True, 0.1, 1e-5)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad, bias.grad


def test_statistics_and_gradients_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    shape = (4, 24, 96, 128)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3  # an offset, as after a convolution
    grad64 = torch.randn(shape, generator=g, dtype=torch.float64)
    w64, b64 = torch.rand(24, generator=g, dtype=torch.float64) + 0.5, torch.randn(24, generator=g, dtype=torch.float64)
    reference = _pass(x64, w64, b64, grad64, F.batch_norm)

    x, grad = x64.float().contiguous(memory_format=CL), grad64.float().contiguous(memory_format=CL)
    ours = _pass(x, w64.float(), b64.float(), grad, batch_norm)
    assert ours[0].is_contiguous(memory_format=CL) and ours[1].is_contiguous(memory_format=CL)
    # NCHW float32 gives about 7e-8 here; PyTorch's channels-last kernel about 1e-6 to 1e-5
    for name, value, ref in zip(("output", "input gradient"), ours[:2], reference[:2]):
        assert relative(value, ref) < 3e-7, name
    for name, value, ref in zip(("weight gradient", "bias gradient"), ours[2:], reference[2:]):
        assert relative(value, ref) < 3e-5, name


def test_a_module_inside_the_block_trains_as_outside_it():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    theirs, ours = copy.deepcopy(bn), copy.deepcopy(bn)
    x = (torch.randn(4, 8, 20, 30) * 3 + 1).contiguous(memory_format=CL)
    for _ in range(2):
        y_ref = theirs(x)
        with exact_batch_norm():
            y = ours(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 2

    # momentum None: the cumulative average, as PyTorch computes it
    theirs.momentum = ours.momentum = None
    theirs(x)
    with exact_batch_norm():
        ours(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("case", ["nchw", "eval", "disabled"])
def test_other_calls_are_pytorch_s_own(case):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).train(case != "eval")
    x = torch.randn(2, 8, 10, 12) * 2 + 1
    if case != "nchw":
        x = x.contiguous(memory_format=CL)
    reference = copy.deepcopy(bn)(x)
    with exact_batch_norm(enabled=case != "disabled"):
        out = bn(x)
    assert torch.equal(out, reference)


def test_one_value_per_channel_is_refused_as_pytorch_does():
    x = torch.randn(1, 4, 1, 1).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("exact", [True, False])
def test_the_training_step_uses_it_as_the_options_say(monkeypatch, exact):
    import fcnseg.train.batchnorm as bn_module
    from fcnseg.train.engine import SegmentationLoss, StepOptions, train_one_epoch

    calls = []
    real = bn_module.batch_norm
    monkeypatch.setattr(bn_module, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))
    model.to(memory_format=CL)
    batches = [(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16)), torch.arange(2)) for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, batches, SegmentationLoss(), opt, device=torch.device("cpu"),
                    options=StepOptions(channels_last=True, exact_batch_norm=exact, progress=False))
    assert len(calls) == (2 if exact else 0)
