"""Segmenter API: image kinds in and out, batches, normalization from the record, tiling against untiled
prediction, test-time augmentation, and ``optimize`` (bf16, channels-last, chunked convolutions).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import fcnseg
from fcnseg.errors import FcnsegError
from fcnseg.inference.optimize import optimize
from fcnseg.inference.segmenter import Segmenter
from fcnseg.inference.options import tile_spans

from tiny_models import random_image, tiny_checkpoint, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_kinds_in_and_out():
    seg = Segmenter(tiny_model())
    img = random_image(61, 83)
    mask = seg(img)
    assert isinstance(mask, np.ndarray) and mask.shape == (61, 83) and mask.dtype == np.uint8
    assert mask.max() < 5
    arr = np.asarray(img)
    assert np.array_equal(seg(arr), mask)
    assert np.array_equal(seg(arr.astype(np.float32) / 255), mask)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    mt = seg(t)
    assert isinstance(mt, torch.Tensor) and mt.dtype == torch.int64 and torch.equal(mt, torch.from_numpy(mask).long())
    assert torch.equal(seg(t.float() / 255), mt)
    assert seg(np.asarray(img.convert("L"))).shape == (61, 83)  # grayscale is replicated to RGB


def test_batches_match_single_calls():
    seg = Segmenter(tiny_model(), batch_size=2)
    images = [random_image(40, 50, s) for s in range(3)] + [random_image(33, 71, 9)]
    masks = seg(images)
    assert [m.shape for m in masks] == [(40, 50)] * 3 + [(33, 71)]
    for im, m in zip(images, masks):
        assert np.array_equal(seg(im), m)
    batch = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images[:3]])
    out = seg(batch)
    assert out.shape == (3, 40, 50) and all(np.array_equal(out[i].numpy(), masks[i]) for i in range(3))


def test_matches_the_model_on_normalised_input(tmp_path):
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    path = tiny_checkpoint(tmp_path / "tiny.safetensors", mean=mean, std=std)
    seg = Segmenter.from_checkpoint(path, channels_last=False)
    assert seg.classes[1] == "thing1" and seg.colors[1].tolist() == [40, 215, 97]
    img = random_image(45, 67)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model = fcnseg.load_checkpoint(path)
    with torch.no_grad():
        logits = model(x)
    pred = seg.segment(img, probs=True)
    assert torch.equal(pred.mask.long(), logits.argmax(1)[0])
    assert pred.probs.dtype == torch.float16 and pred.probs.shape == (5, 45, 67)
    assert torch.allclose(pred.probs.float(), logits.softmax(1)[0], atol=1e-3)


def test_tile_spans_partition_and_align():
    for length, tile, overlap, align in [(1000, 512, 128, 32), (4000, 1024, 256, 32), (700, 256, 128, 32), (97, 40, 8, 1)]:
        spans = tile_spans(length, tile, overlap, align)
        assert spans[0][0] == 0 and spans[-1][1] == length
        for (c0, c1, t0, t1), nxt in zip(spans, spans[1:] + [None]):
            assert t0 <= c0 < c1 <= t1 <= length and t1 - t0 <= tile and t0 % align == 0
            if nxt:
                assert nxt[0] == c1  # cores partition the axis
                assert c0 == 0 or c0 - t0 >= overlap / 2
                assert t1 - c1 >= overlap / 2 or t1 == length  # inner core edges get overlap/2 of context
    assert tile_spans(300, 512, 128, 32) == [(0, 300, 0, 300)]
    with pytest.raises(FcnsegError, match="tile"):
        tile_spans(1000, 64, 128, 32)


def test_tiling_matches_untiled_prediction():
    model = tiny_model()
    img = random_image(500, 700, 3)
    full = Segmenter(model, tile=4096).segment(img, probs=True)
    # margins of 128 px cover this net's receptive field: identical up to float16 storage of probabilities
    tiled = Segmenter(model, tile=384, overlap=256).segment(img, probs=True)
    assert torch.equal(tiled.mask, full.mask)
    assert (tiled.probs.float() - full.probs.float()).abs().max() < 2e-3
    # narrower margins: any difference stays next to a seam
    spans_y, spans_x = tile_spans(500, 256, 64, 32), tile_spans(700, 256, 64, 32)
    narrow = Segmenter(model, tile=256, overlap=64).segment(img)
    differ = (narrow.mask != full.mask).numpy()
    near = np.zeros_like(differ)
    for c0, *_ in spans_y[1:]:
        near[max(0, c0 - 80):c0 + 80, :] = True
    for c0, *_ in spans_x[1:]:
        near[:, max(0, c0 - 80):c0 + 80] = True
    assert not (differ & ~near).any()
    assert differ.mean() < 0.02


def test_flip_tta_is_mirror_symmetric():
    seg = Segmenter(tiny_model(), flip=True)
    img = random_image(48, 64, 5)
    p = seg.segment(img, probs=True).probs.float()
    q = seg.segment(img.transpose(Image.FLIP_LEFT_RIGHT), probs=True).probs.float()
    assert torch.allclose(p, q.flip(-1), atol=2e-3)
    assert torch.allclose(p.sum(0), torch.ones(48, 64), atol=5e-3)


def test_multiscale_tta_averages_probabilities():
    model = tiny_model()
    img = random_image(64, 96, 6)
    single = Segmenter(model).segment(img, probs=True).probs.float()
    assert torch.allclose(Segmenter(model, scales=(1.0,)).segment(img, probs=True).probs.float(), single)
    half = Segmenter(model, scales=(0.5,)).segment(img, probs=True).probs.float()
    both = Segmenter(model, scales=(0.5, 1.0)).segment(img, probs=True).probs.float()
    assert both.shape == (5, 64, 96)
    assert torch.allclose(both, (half + single) / 2, atol=2e-3)


def test_optimize_bfloat16_keeps_the_head_in_float32_and_the_state_dict():
    ref = tiny_model()
    model = optimize(tiny_model(), torch.bfloat16, channels_last=True)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert model.backbone.s8[0].weight.dtype == torch.bfloat16 and model.score_fr.weight.dtype == torch.float32
    assert model.final_up.deconv.weight.dtype == torch.float32
    x = torch.randn(2, 3, 57, 75)
    with torch.no_grad():
        y, yb = ref(x), model(x)
    assert yb.dtype == torch.float32 and yb.shape == y.shape
    assert (y.argmax(1) == yb.argmax(1)).float().mean() > 0.95
    # the same segmenter through the API
    assert Segmenter(tiny_model(), dtype="bfloat16")(random_image(40, 40)).shape == (40, 40)


@pytest.mark.parametrize("native", [True, False])
def test_optimize_warns_when_bfloat16_is_not_native(monkeypatch, native):
    import warnings

    import fcnseg.inference.optimize

    monkeypatch.setattr(fcnseg.hardware, "native_bf16_cpu", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimize(tiny_model(), torch.bfloat16)
        optimize(tiny_model(), torch.float32)
    slow = [w for w in caught if "no native bfloat16" in str(w.message)]
    assert len(slow) == (0 if native else 1) and all(w.category is RuntimeWarning for w in slow)


def test_cli_prints_warnings_in_one_line(monkeypatch, tmp_path, capsys):
    import warnings

    import fcnseg.inference.optimize
    from fcnseg.cli import main

    monkeypatch.setattr(fcnseg.hardware, "native_bf16_cpu", lambda: False)
    src = tmp_path / "x.png"
    random_image(40, 56).save(src)
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # pytest's configuration hides this warning elsewhere
        assert main(["predict", str(src), "--checkpoint", str(ckpt), "--dtype", "bfloat16", "--out",
                     str(tmp_path / "o"), "--quiet"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "bfloat16" in ln]
    assert err == ["fcnseg: warning: this CPU (%s) has no native bfloat16 support: bfloat16 will run slower than "
                   "float32 here" % torch.backends.cpu.get_cpu_capability()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_big_weight_convolutions_are_the_same_convolution(dtype):
    from fcnseg.inference.optimize import BigWeightConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).to(dtype)
    big = BigWeightConv2d.from_conv(conv, chunk_bytes=200)  # several bands of output rows (bf16) or chunks of output channels (float32)
    x = torch.randn(2, 6, 23, 17).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = conv(x).float(), big(x).float()
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5 if dtype == torch.float32 else 0.05)
    assert big.weight is conv.weight and big.bias is conv.bias  # the same parameters, not copies
    # inside a model: optimize replaces convolutions over big_weight_bytes, state dict unchanged
    ref = tiny_model()
    model = optimize(tiny_model(), dtype, channels_last=True, big_weight_bytes=1024)
    assert isinstance(model.fc.fc6, BigWeightConv2d) and list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        y, yb = ref(x), model(x)
    assert (y.argmax(1) == yb.argmax(1)).float().mean() > (0.999 if dtype == torch.float32 else 0.95)


def test_bad_inputs_raise_clear_errors():
    seg = Segmenter(tiny_model())
    with pytest.raises(FcnsegError, match="cannot segment a str"):
        seg("image.png")
    with pytest.raises(FcnsegError, match="shape"):
        seg(np.zeros((4, 5, 6), dtype=np.uint8))
    with pytest.raises(FcnsegError, match="uint8"):
        seg(np.zeros((4, 5, 3), dtype=np.int64))
    with pytest.raises(FcnsegError, match="not installed|no such checkpoint"):
        Segmenter.from_checkpoint("no_such_builtin_model")


def test_fold_batchnorm_keeps_outputs_and_refuses_wrong_pairs():
    from fcnseg.inference.optimize import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net) == 2
        assert torch.allclose(net(x), before, atol=1e-5)

    class Crossed(nn.Module):  # the BatchNorm registered after `conv` normalises `other`'s output
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) + self.bn(self.other(x))

    crossed = Crossed().eval()
    crossed.bn.running_mean.fill_(0.3)
    with torch.no_grad():
        before = crossed(x)
        assert fold_batchnorm(crossed) == 0  # undone
        assert torch.equal(crossed(x), before)


def test_fold_batchnorm_uses_the_layers_eps():
    """A large eps (0.1) makes leaving it out visible: the folded net must still give the BatchNorm's output."""
    from fcnseg.inference.optimize import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=0.1)).eval()
    net[1].running_var.uniform_(0.2, 0.5)
    net[1].running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 12, 16)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net) == 1
        assert isinstance(net[1], nn.Identity)
        torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)


def test_a_model_in_training_mode_is_segmented_in_eval_mode_and_left_as_it_was():
    """Dropout off and batch norm on its running statistics whatever mode the caller's model is in: the masks are
    the eval-mode model's, and the caller's model stays in training mode."""
    model = tiny_model(5)
    with torch.no_grad():
        model.fc.fc6.weight.normal_(0, 0.5)  # fc6 feeds the scores, so dropout after it would change them
        model.score_fr.weight.normal_(0, 0.5)
    model.train()
    image = random_image(64, 80, 3)
    masks = [Segmenter(model, mean=(0.5,) * 3, std=(0.25,) * 3)(image) for _ in range(2)]
    assert model.training and model.fc.drop6.training
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        want = model.eval()(x).argmax(1)[0].numpy()
    assert np.array_equal(masks[0], want) and np.array_equal(masks[1], want)
    assert len(np.unique(want)) > 1


def test_the_tta_module_gives_the_segmenters_probabilities():
    """evaluate --flip/--scales and Segmenter share one averaging: same probabilities for the same image."""
    from fcnseg.inference.options import TestTimeAugmentation

    model = tiny_model().eval()
    img = random_image(40, 56, 7)
    seg = Segmenter(model, flip=True, scales=(0.5, 1.0), dtype="float32", channels_last=False)
    want = seg.segment(img, probs=True).probs.float()
    with torch.no_grad():
        got = TestTimeAugmentation(seg.model, scales=(0.5, 1.0), flip=True)(seg._normalize(
            torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]))[0]
    assert torch.allclose(got, want, atol=2e-3)  # probabilities are stored as float16
    assert torch.allclose(got.sum(0), torch.ones(40, 56), atol=1e-5)
