"""The skip fusion of FCN-8s written out by hand, as in the paper's figure: score the stride-32 features,
upsample 2x with the stride-16 upsampler, add the scaled and scored stride-16 features, upsample 2x with the
stride-8 upsampler, add the stride-8 scores, upsample 8x. Every layer has its own random weights, so a swapped
upsampler or a dropped skip scale changes the result (the torchfcn parity test checks the same on VGG16, but only
where torchfcn is installed)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcnseg.models import FCN

from tiny_models import StridedTinyBackbone


def _crop(t: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    h, w = like.shape[-2:]
    return t[:, :, offset:offset + h, offset:offset + w]


def _fused_by_hand(net: FCN, x: torch.Tensor, scales: tuple[float, float]) -> torch.Tensor:
    f = net.backbone(x)  # {8: 1/8, 16: 1/16, 32: 1/32}
    score = F.conv2d(f[32], net.score_fr.weight, net.score_fr.bias)  # (B, K, H/32, W/32)
    for stride, scale, offset in zip((16, 8), scales, net.skip_offsets):
        up = F.conv_transpose2d(score, net.up[str(stride)].deconv.weight, stride=2)
        layer = net.score_skip[str(stride)]
        skip = F.conv2d(f[stride] * scale, layer.weight, layer.bias)
        score = _crop(up, offset, skip) + skip if offset >= 0 else up + _crop(skip, -offset, up)
    return score  # (B, K, ~H/8, ~W/8)


def test_skips_fuse_in_the_papers_order_with_their_scales():
    torch.manual_seed(0)
    scales = (0.5, 0.25)
    net = FCN(StridedTinyBackbone(), 4, skips=(16, 8), fc_channels=0, skip_scales=scales).eval()
    with torch.no_grad():
        for p in net.parameters():  # the two 2x upsamplers start equal (bilinear): make every layer its own
            p.normal_(0.0, 0.5)
    assert not torch.equal(net.up["16"].deconv.weight, net.up["8"].deconv.weight)
    x = torch.randn(2, 3, 75, 98)
    with torch.no_grad():
        want = _fused_by_hand(net, x, scales)
        torch.testing.assert_close(net.scores(x), want, rtol=1e-5, atol=1e-5)
        logits = F.conv_transpose2d(want, net.final_up.deconv.weight, stride=8)
        torch.testing.assert_close(net(x), _crop(logits, net.final_offset, x), rtol=1e-5, atol=1e-5)


def test_a_skip_scale_of_zero_leaves_only_the_coarser_path():
    """With the stride-8 skip scaled by 0 (and its scorer unbiased), the stride-8 scores are the upsampled
    stride-16 fusion alone: the scale multiplies the features before scoring, as the at-once net's 0.0001 does."""
    torch.manual_seed(1)
    net = FCN(StridedTinyBackbone(), 3, skips=(16, 8), fc_channels=0, skip_scales=(1.0, 0.0)).eval()
    with torch.no_grad():
        for conv in [net.score_fr, *net.score_skip.values()]:
            nn.init.normal_(conv.weight, std=0.5)
        net.score_skip["8"].bias.zero_()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f = net.backbone(x)
        s16 = _crop(net.up["16"](net.score_fr(f[32])), net.skip_offsets[0], f[16]) + net.score_skip["16"](f[16])
        up8 = net.up["8"](s16)
        offset = net.skip_offsets[1]
        want = _crop(up8, offset, f[8]) if offset >= 0 else up8
        torch.testing.assert_close(net.scores(x), want)
        assert want.abs().max() > 0.1  # not trivially zero
