"""How exact is float32 training arithmetic in each memory layout? Errors against a float64 reference, NCHW next to
channels-last: first one forward and backward pass of a whole model in train mode (logits, parameter gradients),
then single layers (output and input gradient), to find which layer loses precision. The third row of the first
table runs the channels-last net with its train-mode batch norms computed on NCHW copies (``batch_norm_in_nchw``),
the fourth with fcnseg's exact channels-last batch norm (``fcnseg.train.batchnorm``, ``exact_batch_norm: true``);
the last two columns of the second table are that one's.

    OMP_NUM_THREADS=2 python benchmarks/layout_precision.py --checkpoint camvid --batch 4 --size 360 480

The inputs are random (seeded): the point is the arithmetic, not the values. Each error is the relative norm
||float32 - float64|| / ||float64||. Gradients whose true value is zero (a batch-norm bias whose per-channel shift
the next training-mode batch norm removes) are rounding noise in every layout; the median and the 90th percentile
over all parameter tensors are the figures to compare.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn as nn


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm().clamp_min(1e-300))


def batch_norm_in_nchw(model: nn.Module) -> nn.Module:
    """``model`` with every batch norm computed on an NCHW copy of its input in train mode, its output turned back to
    channels-last (forward hooks: the weights and their names stay as they are). The candidate fix, for precision
    only: the two layout conversions around each batch norm cost time."""
    def to_nchw(module: nn.Module, args):
        x = args[0]
        module._was_channels_last = (module.training and x.dim() == 4 and not x.is_contiguous()
                                     and x.is_contiguous(memory_format=torch.channels_last))
        return (x.contiguous(),) if module._was_channels_last else None

    def back(module: nn.Module, args, out: torch.Tensor):
        return out.contiguous(memory_format=torch.channels_last) if module._was_channels_last else None

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(to_nchw)
            module.register_forward_hook(back)
    return model


def model_pass(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, channels_last: bool,
               batch_norm: str = "native"):
    """Logits and parameter gradients of one train-mode forward and backward pass (a copy of ``model``), its
    batch norms PyTorch's (``native``), computed on NCHW copies (``nchw``) or fcnseg's exact ones (``exact``)."""
    from fcnseg.train.batchnorm import exact_batch_norm
    from fcnseg.train.engine import SegmentationLoss

    model = copy.deepcopy(model).train()
    if batch_norm == "nchw":
        batch_norm_in_nchw(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with exact_batch_norm(batch_norm == "exact"):
        logits = model(images)
    loss_sum, norm = SegmentationLoss()(logits, masks)
    (loss_sum / norm).backward()
    return logits.detach(), {k: p.grad.detach() for k, p in model.named_parameters() if p.grad is not None}


def layer_pass(layer: nn.Module, x: torch.Tensor, channels_last: bool, dtype: torch.dtype = torch.float32,
               exact: bool = False):
    """Output and input gradient of ``layer`` (a copy, in ``dtype``; ``exact``: inside fcnseg's
    ``exact_batch_norm``) on ``x``, against a fixed random cotangent."""
    from fcnseg.train.batchnorm import exact_batch_norm

    layer = copy.deepcopy(layer).to(dtype)
    x = x.to(dtype).clone().requires_grad_(True)
    xi = x
    if channels_last:
        layer.to(memory_format=torch.channels_last)
        xi = x.contiguous(memory_format=torch.channels_last)
    with exact_batch_norm(exact):
        y = layer(xi)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    (y * cotangent).sum().backward()
    return y.detach(), x.grad.detach()


LAYERS = {  # (layer, input shape, input mean, train mode)
    "batch norm, train mode, input mean 0": (lambda: nn.BatchNorm2d(32), (4, 32, 90, 120), 0.0, True),
    "batch norm, train mode, input mean 5": (lambda: nn.BatchNorm2d(32), (4, 32, 90, 120), 5.0, True),
    "batch norm, eval mode, input mean 5": (lambda: nn.BatchNorm2d(32), (4, 32, 90, 120), 5.0, False),
    "conv 3x3, 32 -> 64": (lambda: nn.Conv2d(32, 64, 3, padding=1), (4, 32, 90, 120), 0.0, True),
    "conv 1x1, 32 -> 64": (lambda: nn.Conv2d(32, 64, 1), (4, 32, 90, 120), 0.0, True),
    "depthwise conv 5x5, stride 2": (lambda: nn.Conv2d(32, 32, 5, 2, 2, groups=32), (4, 32, 90, 120), 0.0, True),
    "transposed conv 16x16, stride 8": (lambda: nn.ConvTranspose2d(11, 11, 16, 8, groups=11, bias=False),
                                        (4, 11, 45, 60), 0.0, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="camvid", help="checkpoint or built-in name")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    from fcnseg.weights.checkpoint import load_checkpoint

    print(f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}; relative error of float32 against float64")
    model = load_checkpoint(args.checkpoint).float()
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, *args.size, generator=g)
    masks = torch.randint(0, model.num_classes, (args.batch, *args.size), generator=g)
    ref_logits, ref_grads = model_pass(copy.deepcopy(model).double(), images.double(), masks, False)
    print(f"\n{args.checkpoint}, one train-mode pass, batch {args.batch} at {args.size[0]}x{args.size[1]}:")
    print(f"{'layout':34s} {'logits':>10s} {'gradients: median':>18s} {'90th pct':>10s}")
    for name, channels_last, batch_norm in (("NCHW", False, "native"), ("channels-last", True, "native"),
                                            ("channels-last, batch norm in NCHW", True, "nchw"),
                                            ("channels-last, exact batch norm", True, "exact")):
        logits, grads = model_pass(model, images, masks, channels_last, batch_norm)
        errors = sorted(relative(grads[k], ref_grads[k]) for k in grads)
        print(f"{name:34s} {relative(logits, ref_logits):10.1e} "
              f"{statistics.median(errors):18.1e} {errors[int(0.9 * (len(errors) - 1))]:10.1e}")

    print(f"\n{'layer':40s} {'NCHW out':>9s} {'grad':>9s} {'CL out':>9s} {'grad':>9s} {'exact out':>9s} {'grad':>9s}")
    for name, (make, shape, mean, train) in LAYERS.items():
        torch.manual_seed(0)
        layer = make().train(train)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)) + mean
        ref_y, ref_dx = layer_pass(layer, x, False, torch.float64)
        row = []
        for channels_last, exact in ((False, False), (True, False), (True, True)):
            y, dx = layer_pass(layer, x, channels_last, exact=exact)
            row += [relative(y, ref_y), relative(dx, ref_dx)]
        print(f"{name:40s} " + " ".join(f"{e:9.1e}" for e in row))


if __name__ == "__main__":
    main()
