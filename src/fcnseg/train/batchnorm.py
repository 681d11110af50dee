"""Train-mode batch norm in channels-last as exact as in NCHW, on the CPU.

PyTorch's CPU kernel for train-mode batch norm on a channels-last tensor sums each channel's values one after the
other in float32, so its batch mean and variance carry relative errors of about 1e-5 on a 8 x 32 x 180 x 240
activation where the NCHW kernel's are near 1e-7; the whole CamVid net's train-mode logits came out 20 times less
exact in channels-last than in NCHW, and its gradients 14 times (``benchmarks/layout_precision.py``).

Inside ``exact_batch_norm()`` (``fcnseg train`` with ``exact_batch_norm: true``) those calls compute the batch
statistics with cascaded sums instead (the mean in one pass over the (pixels, channels) view, the variance around it
in row chunks that stay in cache, accumulated in float64) and normalise with the fast channels-last eval-mode kernel
given those statistics. The backward pass is PyTorch's own kernel fed the exact mean and inverse standard deviation:
its input gradient then matches NCHW's precision, and its weight and bias gradients (about 1e-5 relative) left the
whole net's gradient errors where the NCHW net has them, so computing those exactly too (one more pass) did not pay.
The whole net then trains as exactly as in NCHW (logits 1.7e-6 against 2.8e-5; gradients 6.3e-4 median against
8.6e-3), but more slowly: the CamVid recipe at 4.03 against 4.63 images/s on a 2-core Xeon
(``benchmarks/train_speed.py``, 13%), and its same-seed run ended 0.55 points behind the NCHW run, as the runs with
PyTorch's kernel do. So it is not the default. Every other call (NCHW, eval mode, other dtypes and devices) goes to
PyTorch unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# rows of the (pixels, channels) view whose centred squares are summed at a time: small enough to stay in cache
# (8192 rows of 32 float32 channels are 1 MB)
CHUNK_ELEMENTS = 1 << 18


class _ExactBatchNorm(torch.autograd.Function):
    """``(y, mean, biased variance)`` of a train-mode batch norm of a channels-last ``x`` (N, C, H, W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        channels = x.shape[1]
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: channels-last memory is (pixels, C)
        count = rows.shape[0]
        mean = rows.sum(0).div_(count)
        sq = torch.zeros(channels, dtype=torch.float64, device=x.device)
        for chunk in rows.split(max(1, CHUNK_ELEMENTS // channels)):
            sq += (chunk - mean).square_().sum(0)
        var = sq.div_(count).to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        # eval mode normalises with the statistics it is given: one fused channels-last pass
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_mean, grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y.contiguous(memory_format=torch.channels_last), x, weight, None, None, mean, invstd, True,
            ctx.eps, need)
        return grad_x, grad_w, grad_b, None


def _applies(x: torch.Tensor, training: bool) -> bool:
    return (training and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
            and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` with the exact statistics above where they apply (train mode, a float32
    channels-last CPU tensor); the running statistics are updated as PyTorch does (unbiased variance)."""
    if not _applies(input, training):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    count = input.numel() // input.shape[1]
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    y, mean, var = _ExactBatchNorm.apply(input, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            m = 0.0 if momentum is None else momentum  # None: the module passes the cumulative factor instead
            running_mean.mul_(1 - m).add_(mean, alpha=m)
            running_var.mul_(1 - m).add_(var * (count / (count - 1)), alpha=m)
    return y


class _ExactBatchNormMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def exact_batch_norm(enabled: bool = True) -> contextlib.AbstractContextManager:
    """A block (this thread) in which train-mode batch norms of float32 channels-last CPU tensors use the exact
    statistics of ``batch_norm``; nothing changes with ``enabled`` false."""
    return _ExactBatchNormMode() if enabled else contextlib.nullcontext()
